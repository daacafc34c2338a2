//! The data loader: a deterministic order and per-sample randomness for a seed, the pipeline run by
//! worker threads, a bounded prefetch queue, and batching into `(B, 3, H, W)` tensors.
//!
//! Determinism: the order of epoch `e` is a permutation drawn from `(seed, e)`, and sample `i` of
//! epoch `e` runs its transforms with a generator seeded from `(seed, e, i)`, so results do not
//! depend on the number of workers or on scheduling.

use crate::transforms::Pipeline;
use crate::{DataError, Dataset, Sample};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;

/// Loader options.
#[derive(Clone)]
pub struct DataLoader {
    /// The dataset.
    pub dataset: Arc<dyn Dataset>,
    /// Its pipeline.
    pub pipeline: Pipeline,
    /// Images per batch.
    pub batch_size: usize,
    /// Worker threads (0 = run on the loading thread).
    pub num_workers: usize,
    /// Shuffle each epoch.
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Base seed.
    pub seed: u64,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Failing samples are skipped with a warning (and counted) instead of ending the epoch.
    pub skip_invalid: bool,
    /// mmdet's `AspectRatioBatchSampler`: the orientation group of each sample (0: portrait,
    /// `w < h`; 1: landscape or square), from [`aspect_ratio_groups`]. Batches then take samples
    /// of one group in epoch order; the leftovers of both groups end the epoch. `None`: batches
    /// are consecutive runs of the epoch order (mmengine's default batch sampler).
    pub aspect_groups: Option<Arc<Vec<u8>>>,
    /// Count of the samples skipped so far (shared by clones; read with
    /// [`DataLoader::skipped`]).
    pub skipped: Arc<std::sync::atomic::AtomicUsize>,
    /// This process's part of each epoch in data-parallel runs (rank 0 of 1: everything).
    pub shard: Shard,
}

/// The part of each epoch that one rank of a data-parallel run loads, as mmengine's
/// `DefaultSampler`: the epoch order (the same on every rank: seeded by `seed + epoch`) padded
/// by repeating its head to a multiple of `world` (training: every rank runs the same number of
/// steps), then every `world`-th index from `rank`. Evaluation shards ([`Shard::eval`]) are not
/// padded, so every image is evaluated once (mmengine pads, then drops the duplicates when it
/// collects the results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Whether the order is padded to a multiple of `world`.
    pub pad: bool,
}

impl Default for Shard {
    fn default() -> Self {
        Self::train(0, 1)
    }
}

impl Shard {
    /// The padded shard of a training loader.
    pub fn train(rank: usize, world: usize) -> Self {
        Self {
            rank,
            world,
            pad: true,
        }
    }

    /// The unpadded shard of an evaluation loader: indices `rank, rank + world, …` of the order.
    pub fn eval(rank: usize, world: usize) -> Self {
        Self {
            rank,
            world,
            pad: false,
        }
    }

    /// The indices of `order` this rank takes.
    pub fn take(&self, order: &[usize]) -> Vec<usize> {
        let world = self.world.max(1);
        if world == 1 || order.is_empty() {
            return order.to_vec();
        }
        let total = if self.pad {
            order.len().div_ceil(world) * world
        } else {
            order.len()
        };
        (self.rank..total)
            .step_by(world)
            .map(|i| order[i % order.len()])
            .collect()
    }

    /// Samples per rank and epoch for a dataset of `n`.
    pub fn len(&self, n: usize) -> usize {
        let world = self.world.max(1);
        if self.pad {
            n.div_ceil(world)
        } else {
            n.saturating_sub(self.rank).div_ceil(world)
        }
    }
}

fn mix(a: u64, b: u64) -> u64 {
    // SplitMix64 step over the pair: independent streams per (seed, epoch, index).
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DataLoader {
    /// Number of batches per epoch (of this rank's [`Shard`]).
    pub fn num_batches(&self) -> usize {
        let b = self.batch_size.max(1);
        let chunks = |n: usize| if self.drop_last { n / b } else { n.div_ceil(b) };
        match &self.aspect_groups {
            None => chunks(self.shard.len(self.dataset.len())),
            Some(g) if self.shard.world > 1 => {
                // A rank's shard mixes the two groups differently every epoch, so its count of
                // batches can differ by one between epochs: this is epoch 0's (used to size
                // schedules and progress bars, as mmengine's length of a sharded
                // `AspectRatioBatchSampler`); `epoch` yields each epoch's exact batches.
                let mine = self.shard.take(&self.order_unsharded(0));
                let portrait = mine.iter().filter(|&&i| g.get(i) == Some(&0)).count();
                let landscape = mine.len() - portrait;
                portrait / b + landscape / b + chunks(portrait % b + landscape % b)
            }
            Some(g) => {
                let portrait = g.iter().filter(|&&x| x == 0).count();
                let landscape = g.len() - portrait;
                portrait / b + landscape / b + chunks(portrait % b + landscape % b)
            }
        }
    }

    /// The batches of epoch `epoch` as sample indices (what mmengine's batch sampler yields).
    pub fn batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let b = self.batch_size.max(1);
        let order = self.order(epoch);
        let mut out: Vec<Vec<usize>> = Vec::with_capacity(self.num_batches());
        let left: Vec<usize> = match &self.aspect_groups {
            None => order,
            Some(groups) => {
                let mut buckets: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
                for i in order {
                    let g = usize::from(groups.get(i).copied().unwrap_or(1).min(1));
                    buckets[g].push(i);
                    if buckets[g].len() == b {
                        out.push(std::mem::take(&mut buckets[g]));
                    }
                }
                let [p, l] = buckets;
                p.into_iter().chain(l).collect()
            }
        };
        for chunk in left.chunks(b) {
            if !(self.drop_last && chunk.len() < b) {
                out.push(chunk.to_vec());
            }
        }
        out
    }

    /// Sample indices of epoch `epoch` for this rank ([`Shard`]), in order.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        self.shard.take(&self.order_unsharded(epoch))
    }

    /// The whole epoch's order, the same on every rank.
    fn order_unsharded(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            idx.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch)));
        }
        idx
    }

    /// Runs the pipeline on sample `i` of epoch `epoch`.
    pub fn load(&self, epoch: u64, i: usize) -> Result<Sample, DataError> {
        let mut rng = StdRng::seed_from_u64(mix(mix(self.seed, epoch), i as u64 + 1));
        self.pipeline.apply(self.dataset.sample(i), &mut rng)
    }

    /// The batches of `epoch` (processed samples), prepared by `num_workers` threads with up to
    /// `prefetch` batches queued ahead. Dropping the iterator stops the producer.
    ///
    /// Every failure reaches the consumer as an `Err` item, after which the iterator ends: a
    /// sample's error or a transform's panic as [`DataError::Sample`] (image file and id, the
    /// transform), and a loading thread that stops before the last batch of the epoch (a panic
    /// outside the pipeline) as [`DataError::Loader`]. With `skip_invalid`, failing samples are
    /// left out of their batch with a warning instead.
    pub fn epoch(&self, epoch: u64) -> EpochBatches {
        self.epoch_from(epoch, 0)
    }

    /// As [`DataLoader::epoch`], starting at batch `skip` (resuming mid-epoch): the batches are
    /// the same as those an uninterrupted epoch yields from that point.
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> EpochBatches {
        let (tx, rx) = crossbeam_channel::bounded(self.prefetch.max(1));
        let this = self.clone();
        let expected = self.batches(epoch).len().saturating_sub(skip);
        let handle = std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(this.num_workers.max(1))
                .build();
            for chunk in this.batches(epoch).iter().skip(skip) {
                let run = || -> Vec<Result<Sample, DataError>> {
                    if this.num_workers == 0 {
                        chunk.iter().map(|&i| this.load(epoch, i)).collect()
                    } else {
                        chunk.par_iter().map(|&i| this.load(epoch, i)).collect()
                    }
                };
                let results = match &pool {
                    Ok(p) => p.install(run),
                    Err(_) => run(),
                };
                let mut batch = Vec::with_capacity(results.len());
                let mut failed = None;
                for r in results {
                    match r {
                        Ok(s) => batch.push(s),
                        Err(e) if this.skip_invalid => {
                            this.skipped
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!("skipping sample: {e}")
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                let item = match failed {
                    Some(e) => Err(e),
                    None => Ok(batch),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        EpochBatches {
            rx,
            handle: Some(handle),
            epoch,
            expected,
            received: 0,
            done: false,
        }
    }

    /// Samples left out with a warning (`skip_invalid`) since the loader was built, over all
    /// epochs and clones of it.
    pub fn skipped(&self) -> usize {
        self.skipped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The batches of one epoch (see [`DataLoader::epoch`]).
pub struct EpochBatches {
    rx: crossbeam_channel::Receiver<Result<Vec<Sample>, DataError>>,
    handle: Option<std::thread::JoinHandle<()>>,
    epoch: u64,
    expected: usize,
    received: usize,
    done: bool,
}

impl Iterator for EpochBatches {
    type Item = Result<Vec<Sample>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(item) => {
                self.received += 1;
                self.done = item.is_err();
                Some(item)
            }
            Err(_) => {
                self.done = true;
                // The producer has hung up: at the end of the epoch that is normal; earlier it
                // died, and its panic (if any) is the reason.
                let why = match self.handle.take().map(|h| h.join()) {
                    Some(Err(payload)) => format!(": {}", crate::panic_message(payload.as_ref())),
                    _ => String::new(),
                };
                if self.received < self.expected {
                    Some(Err(DataError::Loader(format!(
                        "the loading thread stopped after {} of {} batches of epoch {}{why}",
                        self.received, self.expected, self.epoch
                    ))))
                } else {
                    None
                }
            }
        }
    }
}

/// The orientation group of every sample for mmdet's `AspectRatioBatchSampler`: 0 when the
/// image is portrait (`width < height`), else 1, from the sizes the annotations give
/// (`Sample::ori_shape` before loading).
///
/// Errors: a sample whose size is unknown before decoding (datasets without image sizes in their
/// annotations, such as ADE20K folders), naming the image.
pub fn aspect_ratio_groups(dataset: &dyn Dataset) -> Result<Vec<u8>, DataError> {
    (0..dataset.len())
        .map(|i| {
            let s = dataset.sample(i);
            let (h, w) = s.ori_shape;
            if h == 0 || w == 0 {
                return Err(DataError::Config(format!(
                    "AspectRatioBatchSampler: {} (image id {}) has no size in the annotations",
                    s.img_path.display(),
                    s.img_id
                )));
            }
            Ok(u8::from(w >= h))
        })
        .collect()
}

/// mmdet's `data_preprocessor` normalisation (RGB mean / std on 0–255 pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Channel means.
    pub mean: [f32; 3],
    /// Channel standard deviations.
    pub std: [f32; 3],
}

/// A batch ready for a model.
pub struct Batch {
    /// `(B, 3, H, W)` f32, each image normalised (if requested) then zero-padded bottom/right to
    /// the largest size in the batch rounded up to `pad_size_divisor`.
    pub images: Tensor,
    /// `(B, H, W)` u8 label maps padded with 255, when the samples have them.
    pub seg_maps: Option<Tensor>,
    /// The samples with their metadata, instances and masks (images dropped).
    pub samples: Vec<Sample>,
}

/// Batches processed samples (mmdet's `DetDataPreprocessor`: normalise, then pad with 0 to a
/// common size that is a multiple of `pad_size_divisor`).
///
/// Errors: a sample without an image.
pub fn collate(
    samples: Vec<Sample>,
    norm: Option<&Normalization>,
    pad_size_divisor: usize,
    device: &Device,
) -> Result<Batch, DataError> {
    collate_to(samples, norm, pad_size_divisor, None, device)
}

/// [`collate`] padding to at least `min_size = (h, w)` as well (mmseg `SegDataPreProcessor.size`:
/// training batches are padded to the crop size, images with 0 after normalisation and label maps
/// with 255).
///
/// Errors: a sample without an image.
pub fn collate_to(
    mut samples: Vec<Sample>,
    norm: Option<&Normalization>,
    pad_size_divisor: usize,
    min_size: Option<(usize, usize)>,
    device: &Device,
) -> Result<Batch, DataError> {
    let d = pad_size_divisor.max(1);
    let mut hmax = 0;
    let mut wmax = 0;
    for s in &samples {
        let img = s.img.as_ref().ok_or_else(|| {
            DataError::Config(format!(
                "{}: no image loaded (pipeline lacks LoadImageFromFile)",
                s.img_path.display()
            ))
        })?;
        hmax = hmax.max(img.dim().0);
        wmax = wmax.max(img.dim().1);
    }
    if let Some((mh, mw)) = min_size {
        hmax = hmax.max(mh);
        wmax = wmax.max(mw);
    }
    let (h, w) = (hmax.div_ceil(d) * d, wmax.div_ceil(d) * d);
    let b = samples.len();
    let mut data = vec![0f32; b * 3 * h * w];
    let has_seg = samples.iter().all(|s| s.gt_seg_map.is_some()) && b > 0;
    let mut seg = if has_seg {
        vec![255u8; b * h * w]
    } else {
        vec![]
    };
    for (i, s) in samples.iter_mut().enumerate() {
        let img = s.img.take().expect("checked");
        let (ih, iw, _) = img.dim();
        for y in 0..ih {
            for x in 0..iw {
                for c in 0..3 {
                    let mut v = img[(y, x, c)];
                    if let Some(n) = norm {
                        v = (v - n.mean[c]) / n.std[c];
                    }
                    data[((i * 3 + c) * h + y) * w + x] = v;
                }
            }
        }
        if has_seg {
            let m = s.gt_seg_map.as_ref().expect("checked");
            let (mh, mw) = m.dim();
            for y in 0..mh.min(h) {
                for x in 0..mw.min(w) {
                    seg[(i * h + y) * w + x] = m[(y, x)];
                }
            }
        }
    }
    let err = |e: candle_core::Error| DataError::Config(format!("batching: {e}"));
    let images = Tensor::from_vec(data, (b, 3, h, w), device).map_err(err)?;
    let seg_maps = if has_seg {
        Some(Tensor::from_vec(seg, (b, h, w), device).map_err(err)?)
    } else {
        None
    };
    Ok(Batch {
        images,
        seg_maps,
        samples,
    })
}
