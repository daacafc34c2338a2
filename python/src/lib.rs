//! `import densepred`: the Python module (pyo3, built by maturin from `python/pyproject.toml`).
//!
//! numpy in, numpy out. Every call that computes releases the GIL; errors surface as
//! `FileNotFoundError` (a named file or folder is missing), `ValueError` (bad arguments, config
//! keys, file contents) or `RuntimeError` (a failure inside the computation), each with the Rust
//! message, which names the file, record and field at fault. The signatures and docstrings are
//! mirrored in `densepred.pyi`.

use candle_core::{DType, Device, Tensor};
use densepred_backbones::Backbone as _;
use densepred_core::threads::run_on_pool;
use densepred_datasets::DataError;
use densepred_engine::backbone::{build_backbone, LoadedBackbone};
use densepred_engine::inference::{ImageInput, Inferencer};
use densepred_engine::runner::{work_dir_for, EngineError, RunConfig};
use densepred_evaluation::{coco, semseg, EvalError};
use ndarray::Array3;
use numpy::{
    IntoPyArray, PyArray4, PyReadonlyArray3, PyReadonlyArray4, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Errors

/// `FileNotFoundError` when `path` does not exist, else `ValueError` (the file is there but its
/// contents are wrong). In-memory inputs carry placeholder names such as `<detections>` or
/// `<array 0>`: those are `ValueError`s.
fn file_error(path: &Path, msg: String) -> PyErr {
    let placeholder = path.to_string_lossy().starts_with('<');
    if !placeholder && (path.as_os_str().is_empty() || !path.exists()) {
        PyFileNotFoundError::new_err(msg)
    } else {
        PyValueError::new_err(msg)
    }
}

fn data_err(e: DataError) -> PyErr {
    let msg = e.to_string();
    match e.root() {
        DataError::File { path, .. } => file_error(path, msg),
        DataError::Panic(_) | DataError::Loader(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

fn eval_err(e: EvalError) -> PyErr {
    let msg = e.to_string();
    match &e {
        EvalError::File { path, .. } => file_error(path, msg),
        EvalError::Invalid(_) => PyValueError::new_err(msg),
    }
}

/// Maps an engine error to the Python exception its kind calls for.
fn engine_err(e: EngineError) -> PyErr {
    let msg = e.to_string();
    match e {
        EngineError::Config(_) => PyValueError::new_err(msg),
        EngineError::File { path, .. } => file_error(&path, msg),
        EngineError::Data(d) => data_err(d),
        EngineError::Eval(v) => eval_err(v),
        EngineError::Candle { .. } => PyRuntimeError::new_err(msg),
        EngineError::Interrupted => PyKeyboardInterrupt::new_err(
            "training interrupted; the last checkpoint in the work dir is intact",
        ),
    }
}

fn candle_err(e: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// `FileNotFoundError` naming `what` unless `path` is an existing file.
fn require_file(path: &Path, what: &str) -> PyResult<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!(
            "{what} {}: no such file",
            path.display()
        )))
    }
}

/// `FileNotFoundError` naming `what` unless `path` is an existing folder.
fn require_dir(path: &Path, what: &str) -> PyResult<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!(
            "{what} {}: no such folder",
            path.display()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

/// The device named by `device` (`"cpu"`, `"cuda"`, `"cuda:N"`), as the CLI's `--device`.
fn parse_device(device: &str) -> PyResult<Device> {
    densepred_engine::device::parse_device(device).map_err(engine_err)
}

/// A Python value as a TOML literal for a `--set key=value` override.
fn toml_literal(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = v.extract::<bool>() {
        return Ok(b.to_string());
    }
    if v.is_instance_of::<PyString>() {
        let s: String = v.extract()?;
        return Ok(toml::Value::String(s).to_string());
    }
    if let Ok(i) = v.extract::<i64>() {
        return Ok(i.to_string());
    }
    if let Ok(f) = v.extract::<f64>() {
        return Ok(toml::Value::Float(f).to_string());
    }
    if let Ok(l) = v.cast::<PyList>() {
        let items: PyResult<Vec<String>> = l.iter().map(|x| toml_literal(&x)).collect();
        return Ok(format!("[{}]", items?.join(", ")));
    }
    if let Ok(t) = v.cast::<pyo3::types::PyTuple>() {
        let items: PyResult<Vec<String>> = t.iter().map(|x| toml_literal(&x)).collect();
        return Ok(format!("[{}]", items?.join(", ")));
    }
    Err(PyValueError::new_err(format!(
        "overrides: cannot write {} as a config value (use str, int, float, bool or a list)",
        v.repr()?
    )))
}

/// `overrides` as `key=value` strings: a dict `{"train_cfg.max_iters": 5}` or a list of
/// `"key=value"` strings.
fn override_strings(overrides: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(o) = overrides else {
        return Ok(Vec::new());
    };
    if o.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(d) = o.cast::<PyDict>() {
        let mut out = Vec::new();
        for (k, v) in d.iter() {
            let k: String = k.extract().map_err(|_| {
                PyTypeError::new_err("overrides: keys must be str (dotted config paths)")
            })?;
            out.push(format!("{k}={}", toml_literal(&v)?));
        }
        return Ok(out);
    }
    if !o.is_instance_of::<PyString>() {
        if let Ok(v) = o.extract::<Vec<String>>() {
            for s in &v {
                if !s.contains('=') {
                    return Err(PyValueError::new_err(format!(
                        "overrides: {s:?} is not of the form key=value"
                    )));
                }
            }
            return Ok(v);
        }
    }
    Err(PyTypeError::new_err(
        "overrides: expected a dict {\"key.path\": value} or a list of \"key=value\" strings",
    ))
}

/// Loads a run config with overrides (`_base_` merged).
fn load_config(config: &Path, overrides: &[String]) -> PyResult<(RunConfig, toml::Table)> {
    require_file(config, "config")?;
    RunConfig::load(config, overrides).map_err(engine_err)
}

/// An image argument: a path (str or os.PathLike) or an `(H, W, 3)` uint8 RGB array.
fn image_input(obj: &Bound<'_, PyAny>, index: usize) -> PyResult<ImageInput> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        let shape = a.shape().to_vec();
        let dtype = a.dtype().str()?.to_string();
        if shape.len() != 3 || shape[2] != 3 {
            return Err(PyValueError::new_err(format!(
                "image {index}: expected an (H, W, 3) RGB array, got shape {shape:?}"
            )));
        }
        let arr: PyReadonlyArray3<u8> = obj.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "image {index}: expected dtype uint8 (RGB 0-255), got {dtype}"
            ))
        })?;
        let owned: Array3<u8> = arr.as_array().to_owned();
        return Ok(ImageInput::Rgb(owned));
    }
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        let p: PathBuf = obj.extract()?;
        require_file(&p, &format!("image {index}"))?;
        return Ok(ImageInput::Path(p));
    }
    Err(PyTypeError::new_err(format!(
        "image {index}: expected a path or an (H, W, 3) uint8 numpy array, got {}",
        obj.get_type().name()?
    )))
}

/// serde_json value → Python object (through the json module, so NaN/None follow its rules).
fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

// ---------------------------------------------------------------------------------------------
// Detector / Segmentor

/// Builds an inferencer with the GIL released (`opts`: device, overrides, strict loading) and
/// checks that the config builds a segmentor (`segmentor`) or a detector.
fn build_inferencer(
    py: Python<'_>,
    config: &Path,
    checkpoint: Option<&Path>,
    (device, overrides, strict): (&str, Option<&Bound<'_, PyAny>>, bool),
    segmentor: bool,
) -> PyResult<Inferencer> {
    let dev = parse_device(device)?;
    let overrides = override_strings(overrides)?;
    let (cfg, _) = load_config(config, &overrides)?;
    if let Some(c) = checkpoint {
        require_file(c, "checkpoint")?;
    }
    let inner = py
        .detach(|| Inferencer::new(&cfg, checkpoint, strict, &dev))
        .map_err(engine_err)?;
    match (segmentor, inner.is_segmentor()) {
        (false, true) => Err(PyValueError::new_err(format!(
            "{}: model.type is EncoderDecoder (a segmentor); use densepred.Segmentor",
            config.display()
        ))),
        (true, false) => Err(PyValueError::new_err(format!(
            "{}: the model is a detector; use densepred.Detector",
            config.display()
        ))),
        _ => Ok(inner),
    }
}

/// An object detector built from a config: `Detector(config, checkpoint=None, device="cpu",
/// overrides=None)`.
#[pyclass(module = "densepred", frozen)]
struct Detector {
    inner: Inferencer,
    config: PathBuf,
}

impl Detector {
    fn to_dict<'py>(
        &self,
        py: Python<'py>,
        d: &densepred_core::structures::Detections,
    ) -> PyResult<Bound<'py, PyDict>> {
        let n = d.len();
        let flat: Vec<f32> = d.bboxes.iter().flat_map(|b| b.iter().copied()).collect();
        let boxes = ndarray::Array2::from_shape_vec((n, 4), flat)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let names: Vec<String> = d
            .labels
            .iter()
            .map(|&l| {
                self.inner
                    .classes()
                    .get(l as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("class_{l}"))
            })
            .collect();
        let out = PyDict::new(py);
        out.set_item("boxes", boxes.into_pyarray(py))?;
        out.set_item("scores", d.scores.clone().into_pyarray(py))?;
        out.set_item("labels", d.labels.clone().into_pyarray(py))?;
        out.set_item("class_names", names)?;
        if let Some(m) = &d.masks {
            // (N, H, W) bool in the original frame.
            let (h, w) = m.size;
            let flat: Vec<bool> = m.masks.iter().flatten().map(|&v| v != 0).collect();
            let masks = ndarray::Array3::from_shape_vec((m.len(), h, w), flat)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            out.set_item("masks", masks.into_pyarray(py))?;
        }
        Ok(out)
    }

    fn run<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<ImageInput>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let dets = py
            .detach(|| run_on_pool(|| self.inner.detect(&inputs)))
            .map_err(engine_err)?;
        dets.iter().map(|d| self.to_dict(py, d)).collect()
    }
}

#[pymethods]
impl Detector {
    #[new]
    #[pyo3(signature = (config, checkpoint=None, device="cpu", overrides=None, strict=true))]
    fn new(
        py: Python<'_>,
        config: PathBuf,
        checkpoint: Option<PathBuf>,
        device: &str,
        overrides: Option<&Bound<'_, PyAny>>,
        strict: bool,
    ) -> PyResult<Self> {
        let opts = (device, overrides, strict);
        let inner = build_inferencer(py, &config, checkpoint.as_deref(), opts, false)?;
        Ok(Self { inner, config })
    }

    /// Detections in one image (a path or an `(H, W, 3)` uint8 RGB array): a dict with `boxes`
    /// `(N, 4)` float32 xyxy in original-image pixels, `scores` `(N,)` float32, `labels` `(N,)`
    /// int64 (0-based), `class_names` (N str).
    fn predict<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let input = image_input(image, 0)?;
        Ok(self.run(py, vec![input])?.remove(0))
    }

    /// `predict` on a list of images, run as one batch; a list of dicts.
    fn predict_batch<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let inputs: PyResult<Vec<ImageInput>> = images
            .iter()
            .enumerate()
            .map(|(i, im)| image_input(im, i))
            .collect();
        self.run(py, inputs?)
    }

    /// Class names, indexed by label.
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.classes().to_vec()
    }

    fn __repr__(&self) -> String {
        format!(
            "densepred.Detector({:?}, {} classes)",
            self.config.display().to_string(),
            self.inner.classes().len()
        )
    }
}

/// A semantic segmentor built from a config: `Segmentor(config, checkpoint=None, device="cpu",
/// overrides=None)`.
#[pyclass(module = "densepred", frozen)]
struct Segmentor {
    inner: Inferencer,
    config: PathBuf,
}

impl Segmentor {
    fn run<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<ImageInput>,
    ) -> PyResult<Vec<Bound<'py, numpy::PyArray2<i32>>>> {
        let maps = py
            .detach(|| run_on_pool(|| self.inner.segment(&inputs)))
            .map_err(engine_err)?;
        Ok(maps
            .into_iter()
            .map(|m| m.mapv(|v| v as i32).into_pyarray(py))
            .collect())
    }
}

#[pymethods]
impl Segmentor {
    #[new]
    #[pyo3(signature = (config, checkpoint=None, device="cpu", overrides=None, strict=true))]
    fn new(
        py: Python<'_>,
        config: PathBuf,
        checkpoint: Option<PathBuf>,
        device: &str,
        overrides: Option<&Bound<'_, PyAny>>,
        strict: bool,
    ) -> PyResult<Self> {
        let opts = (device, overrides, strict);
        let inner = build_inferencer(py, &config, checkpoint.as_deref(), opts, true)?;
        Ok(Self { inner, config })
    }

    /// The label map `(H, W)` int32 of 0-based class indices (original image size) of one image
    /// (a path or an `(H, W, 3)` uint8 RGB array).
    fn predict<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, numpy::PyArray2<i32>>> {
        let input = image_input(image, 0)?;
        Ok(self.run(py, vec![input])?.remove(0))
    }

    /// `predict` on a list of images, run as one batch.
    fn predict_batch<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, numpy::PyArray2<i32>>>> {
        let inputs: PyResult<Vec<ImageInput>> = images
            .iter()
            .enumerate()
            .map(|(i, im)| image_input(im, i))
            .collect();
        self.run(py, inputs?)
    }

    /// Class names, indexed by label.
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.classes().to_vec()
    }

    /// `reduce_zero_label` of the config's test dataset: its label PNGs store class `l` as `l + 1`.
    #[getter]
    fn reduce_zero_label(&self) -> bool {
        self.inner.reduce_zero_label()
    }

    fn __repr__(&self) -> String {
        format!(
            "densepred.Segmentor({:?}, {} classes)",
            self.config.display().to_string(),
            self.inner.classes().len()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Backbone

/// A backbone alone: `Backbone(config, weights=None, device="cpu")`.
#[pyclass(module = "densepred", frozen)]
struct Backbone {
    inner: LoadedBackbone,
    device: Device,
}

#[pymethods]
impl Backbone {
    #[new]
    #[pyo3(signature = (config, weights=None, device="cpu"))]
    fn new(
        py: Python<'_>,
        config: PathBuf,
        weights: Option<PathBuf>,
        device: &str,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        require_file(&config, "config")?;
        if let Some(w) = &weights {
            require_file(w, "weights")?;
        }
        let inner = py
            .detach(|| build_backbone(&config, weights.as_deref(), &device))
            .map_err(engine_err)?;
        Ok(Self { inner, device })
    }

    /// The four stage maps `(B, C_i, H/s_i, W/s_i)` float32 (s = 4, 8, 16, 32) of `x`
    /// `(B, 3, H, W)` float32 (normalised pixels), in eval mode.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyArray4<f32>>>> {
        let a = x
            .cast::<PyUntypedArray>()
            .map_err(|_| PyTypeError::new_err("x: expected a (B, 3, H, W) float32 numpy array"))?;
        let shape = a.shape().to_vec();
        if shape.len() != 4 || shape[1] != 3 || shape.contains(&0) {
            return Err(PyValueError::new_err(format!(
                "x: expected shape (B, 3, H, W) with B, H, W > 0, got {shape:?}"
            )));
        }
        let dtype = a.dtype().str()?.to_string();
        let arr: PyReadonlyArray4<f32> = x.extract().map_err(|_| {
            PyValueError::new_err(format!("x: expected dtype float32, got {dtype}"))
        })?;
        let data: Vec<f32> = arr.as_array().iter().copied().collect();
        let dev = self.device.clone();
        let stages = py
            .detach(|| {
                run_on_pool(|| -> candle_core::Result<Vec<(Vec<usize>, Vec<f32>)>> {
                    let t = Tensor::from_vec(data, shape.as_slice(), &dev)?;
                    let outs = self.inner.inference.forward_stages(&t, false)?;
                    outs.into_iter()
                        .map(|o| {
                            let dims = o.dims().to_vec();
                            let v = o.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                            Ok((dims, v))
                        })
                        .collect()
                })
            })
            .map_err(candle_err)?;
        stages
            .into_iter()
            .map(|(dims, v)| {
                let a = ndarray::Array4::from_shape_vec((dims[0], dims[1], dims[2], dims[3]), v)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                Ok(a.into_pyarray(py))
            })
            .collect()
    }

    /// `(channels, stride)` of each stage output.
    #[getter]
    fn out_shapes(&self) -> Vec<(usize, usize)> {
        self.inner
            .inference
            .out_shapes()
            .iter()
            .map(|s| (s.channels, s.stride))
            .collect()
    }

    /// The parameter names and shapes, as in the official state dict.
    fn state_dict_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.inner
            .vars
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().dims().to_vec()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// train / test

/// Runs `work` on a thread of its own while this thread, holding no GIL between checks, polls
/// Python's signal handlers every 100 ms: on `KeyboardInterrupt` it raises `flag` (the trainer
/// stops after the iteration in flight and keeps its checkpoints) and re-raises once the work
/// has stopped.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    flag: Arc<AtomicBool>,
    work: impl FnOnce() -> Result<T, EngineError> + Send,
) -> PyResult<T> {
    let mut pending: Option<PyErr> = None;
    let result = py.detach(|| {
        std::thread::scope(|s| {
            let handle = s.spawn(|| run_on_pool(work));
            while !handle.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if pending.is_none() {
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        eprintln!("\ninterrupt: stopping after this iteration");
                        flag.store(true, Ordering::SeqCst);
                        pending = Some(e);
                    }
                }
            }
            handle.join()
        })
    });
    let result = match result {
        Ok(r) => r,
        Err(_) => {
            return Err(PyRuntimeError::new_err(
                "densepred: the worker thread panicked",
            ))
        }
    };
    match (result, pending) {
        (Err(EngineError::Interrupted), Some(e)) => Err(e),
        (r, Some(e)) => {
            // Interrupted after the work had already ended: report the interrupt all the same.
            drop(r);
            Err(e)
        }
        (r, None) => r.map_err(engine_err),
    }
}

/// Trains the model of `config` (as `densepred train`): same logs, progress bars, checkpoints and
/// work dir. Returns a dict: `work_dir`, `iters`, `last_checkpoint` (path or None), `metrics`
/// (the last validation metrics or None).
#[pyfunction]
#[pyo3(signature = (config, work_dir=None, resume=false, overrides=None, load_from=None, progress=true, device=None))]
#[allow(clippy::too_many_arguments)]
fn train<'py>(
    py: Python<'py>,
    config: PathBuf,
    work_dir: Option<PathBuf>,
    resume: bool,
    overrides: Option<&Bound<'py, PyAny>>,
    load_from: Option<PathBuf>,
    progress: bool,
    device: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let overrides = override_strings(overrides)?;
    let (cfg, table) = load_config(&config, &overrides)?;
    if let Some(l) = &load_from {
        require_file(l, "load_from")?;
    }
    let work_dir = work_dir_for(&cfg, &config, work_dir.as_deref());
    let flag = Arc::new(AtomicBool::new(false));
    let opts = densepred_engine::trainer::TrainOptions {
        work_dir: work_dir.clone(),
        resume: resume || cfg.resume,
        load_from,
        device: densepred_engine::device::resolve_device(device, &cfg).map_err(engine_err)?,
        progress,
        interrupt: Some(flag.clone()),
        dist: None,
    };
    tracing::info!("work dir: {}", work_dir.display());
    let summary = run_interruptible(py, flag, || {
        densepred_engine::trainer::train(&cfg, &table, &opts)
    })?;
    let out = PyDict::new(py);
    out.set_item("work_dir", work_dir.display().to_string())?;
    out.set_item("iters", summary.iters)?;
    out.set_item(
        "last_checkpoint",
        summary.last_checkpoint.map(|p| p.display().to_string()),
    )?;
    match &summary.last_val {
        Some(m) => out.set_item(
            "metrics",
            json_to_py(py, &serde_json::Value::Object(m.clone()))?,
        )?,
        None => out.set_item("metrics", py.None())?,
    }
    Ok(out)
}

/// Evaluates `checkpoint` on the config's test split (as `densepred test`; the checkpoint loads
/// strictly unless `strict=False`). Detectors: the 12 COCO stats (`AP`, `AP50`, …, `ARl`,
/// fractions, −1 where undefined); segmentors: `mIoU`, `mAcc`, `aAcc` and per-class `IoU` /
/// `Acc` lists (fractions, NaN as None).
#[pyfunction]
#[pyo3(signature = (config, checkpoint, overrides=None, progress=true, strict=true, device=None))]
fn test<'py>(
    py: Python<'py>,
    config: PathBuf,
    checkpoint: PathBuf,
    overrides: Option<&Bound<'py, PyAny>>,
    progress: bool,
    strict: bool,
    device: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let overrides = override_strings(overrides)?;
    let (cfg, _) = load_config(&config, &overrides)?;
    require_file(&checkpoint, "checkpoint")?;
    let dev = densepred_engine::device::resolve_device(device, &cfg).map_err(engine_err)?;
    let metrics = py
        .detach(|| run_on_pool(|| test_impl(&cfg, &checkpoint, progress, strict, &dev)))
        .map_err(engine_err)?;
    json_to_py(py, &metrics)
}

/// The metrics of [`test`] (the run itself is the engine's, shared with `densepred test`).
fn test_impl(
    cfg: &RunConfig,
    checkpoint: &Path,
    progress: bool,
    strict: bool,
    device: &Device,
) -> Result<serde_json::Value, EngineError> {
    use densepred_engine::tester::{test_checkpoint, SegTestOptions, TestRun, TestRunOptions};
    let opts = TestRunOptions {
        strict,
        seg: SegTestOptions {
            show_progress: progress,
            ..SegTestOptions::default()
        },
        dist: None,
    };
    match test_checkpoint(cfg, checkpoint, &opts, device)? {
        TestRun::Segmentation(out) => match &out.metrics {
            Some(m) => {
                println!("per class results:\n{}", m.table(Some(&out.classes)));
                Ok(m.to_json())
            }
            None => Err(EngineError::Config(
                "the test split has no label maps: nothing to evaluate".into(),
            )),
        },
        TestRun::Detection(out) => match out.stats_json() {
            Some(stats) => {
                for s in out.summaries() {
                    println!("Evaluate annotation type *{}*", s.iou_type.as_str());
                    for l in &s.summary_lines {
                        println!("{l}");
                    }
                }
                Ok(stats)
            }
            None => Err(EngineError::Config(
                "the test split has no annotation file: nothing to evaluate".into(),
            )),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluators

fn iou_type(s: &str) -> PyResult<coco::CocoIouType> {
    match s {
        "bbox" => Ok(coco::CocoIouType::Bbox),
        "segm" => Ok(coco::CocoIouType::Segm),
        _ => Err(PyValueError::new_err(format!(
            "iou_type {s:?}: expected \"bbox\" or \"segm\""
        ))),
    }
}

/// COCO evaluation of `results` (a results JSON path, or a list of dicts `{image_id,
/// category_id, bbox | segmentation, score}`) against the ground truth `gt_json`, with
/// pycocotools' numbers: a dict of the 12 stats `AP` … `ARl` (fractions; −1 where undefined).
#[pyfunction]
#[pyo3(signature = (gt_json, results, iou_type="bbox"))]
fn evaluate_coco<'py>(
    py: Python<'py>,
    gt_json: PathBuf,
    results: &Bound<'py, PyAny>,
    iou_type: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let it = self::iou_type(iou_type)?;
    require_file(&gt_json, "gt_json")?;
    enum Res {
        File(PathBuf),
        Records(Vec<serde_json::Value>),
    }
    let res = if results.is_instance_of::<PyString>() || results.hasattr("__fspath__")? {
        let p: PathBuf = results.extract()?;
        require_file(&p, "results")?;
        Res::File(p)
    } else if results.cast::<PyList>().is_ok() || results.cast::<pyo3::types::PyTuple>().is_ok() {
        // numpy scalars and arrays inside the records become plain numbers and lists.
        let default = py.eval(
            c"lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)",
            None,
            None,
        )?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("default", default)?;
        let text: String = py
            .import("json")?
            .call_method("dumps", (results,), Some(&kwargs))?
            .extract()?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| PyValueError::new_err(format!("results: {e}")))?;
        for (i, r) in v.iter().enumerate() {
            if !r.is_object() {
                return Err(PyValueError::new_err(format!(
                    "results: record {i} is not a dict"
                )));
            }
        }
        Res::Records(v)
    } else {
        return Err(PyTypeError::new_err(
            "results: expected a path to a results JSON or a list of dicts",
        ));
    };
    let summary = py
        .detach(|| {
            let g = coco::load_gt(&gt_json)?;
            match &res {
                Res::File(p) => coco::evaluate_results_file(&g, p, it),
                Res::Records(r) => coco::evaluate_records(&g, r, it),
            }
        })
        .map_err(eval_err)?;
    json_to_py(py, &summary.stats_json())
}

/// mmseg `IoUMetric` over 8-bit PNG label maps paired by file stem: a dict `mIoU`, `mAcc`,
/// `aAcc` (fractions) and per-class `IoU` / `Acc` lists (NaN as None for absent classes).
#[pyfunction]
#[pyo3(signature = (gt_dir, pred_dir, num_classes, reduce_zero_label=false))]
fn evaluate_segmentation<'py>(
    py: Python<'py>,
    gt_dir: PathBuf,
    pred_dir: PathBuf,
    num_classes: usize,
    reduce_zero_label: bool,
) -> PyResult<Bound<'py, PyAny>> {
    require_dir(&gt_dir, "gt_dir")?;
    require_dir(&pred_dir, "pred_dir")?;
    if num_classes == 0 || num_classes > 255 {
        return Err(PyValueError::new_err(format!(
            "num_classes {num_classes}: expected 1–255 (8-bit label maps, 255 = ignore)"
        )));
    }
    let m = py
        .detach(|| semseg::evaluate_folders(&gt_dir, &pred_dir, num_classes, reduce_zero_label))
        .map_err(eval_err)?;
    json_to_py(py, &m.to_json())
}

// ---------------------------------------------------------------------------------------------
// Module

#[pymodule]
fn densepred(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the CLI: candle's thread counts (CANDLE_NUM_THREADS=1, RAYON_NUM_THREADS fixed) unless
    // the user chose them.
    densepred_core::threads::set_default_thread_env();
    // Heavy calls run on a rayon worker (densepred_core::threads::run_on_pool), with big stacks.
    densepred_core::threads::init_global_pool();
    // The CLI's log lines (training progress, warnings) on stderr; RUST_LOG filters them. A
    // second import, or a host that installed a subscriber, keeps the existing one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Detector>()?;
    m.add_class::<Segmentor>()?;
    m.add_class::<Backbone>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(test, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_coco, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_segmentation, m)?)?;
    Ok(())
}
