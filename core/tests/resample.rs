//! Bilinear resize and adaptive average pooling against values and input gradients recorded
//! from PyTorch (`tests/data/make_resample.py`: `F.interpolate(mode="bilinear")` with
//! `align_corners` false/true, up- and down-sampling with non-integer factors, and
//! `F.adaptive_avg_pool2d` including outputs larger than the input, as UperNet's PPM uses).
//!
//! Our kernels run in f32 here (as models do) against float64 PyTorch values of magnitude ≤ ~10:
//! 1e-5 absolute covers f32 rounding of a few multiply-adds; a wrong tap or weight moves values by
//! ≥ 1e-2.

use candle_core::{DType, Device, Tensor, Var};
use densepred_core::ops::{adaptive_avg_pool2d, resize_bilinear};

fn vec_f64(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn resample_matches_pytorch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/resample.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = d["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let shape: Vec<usize> = c["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let out: Vec<usize> = c["out"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::from_vec(vec_f64(&c["x"]), shape.as_slice(), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let op = c["op"].as_str().unwrap();
        let y = match op {
            "bilinear" => {
                resize_bilinear(&x, out[0], out[1], c["align_corners"].as_bool().unwrap())
            }
            _ => adaptive_avg_pool2d(&x, out[0], out[1]),
        }
        .unwrap();
        let ours: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let want = vec_f64(&c["y"]);
        assert_eq!(ours.len(), want.len(), "{op} {shape:?}->{out:?}");
        let err = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-5,
            "{op} {shape:?}->{out:?} ac={}: value err {err}",
            c["align_corners"]
        );
        let proj = Tensor::from_vec(vec_f64(&c["proj"]), y.dims(), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let g = densepred_testutil::grads_of_dot(&y, &proj);
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want_grad = vec_f64(&c["grad"]);
        assert_eq!(
            gx.len(),
            want_grad.len(),
            "{op} {shape:?}->{out:?} gradient"
        );
        let gerr = gx
            .iter()
            .zip(want_grad)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(gerr < 1e-5, "{op} {shape:?}->{out:?}: grad err {gerr}");
    }
}
