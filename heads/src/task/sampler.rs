//! Samplers: which assigned priors enter the loss (mmdetection `PseudoSampler`, `RandomSampler`).

use super::assigner::AssignResult;
use densepred_core::config::defaults as d;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Indices of the sampled positives and negatives, and how many leading entries are gt boxes
/// added as proposals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplingResult {
    /// Positive prior indices (into the priors, after any prepended gts).
    pub pos_inds: Vec<usize>,
    /// Negative prior indices.
    pub neg_inds: Vec<usize>,
    /// For each positive, its gt index (0-based).
    pub pos_assigned_gt_inds: Vec<usize>,
    /// Number of gt boxes prepended to the priors (`add_gt_as_proposals`).
    pub num_gts_added: usize,
}

/// `type = "PseudoSampler"`: every positive (`gt_inds > 0`) and every negative (`gt_inds == 0`).
pub fn pseudo_sample(a: &AssignResult) -> SamplingResult {
    let pos_inds: Vec<usize> = (0..a.gt_inds.len()).filter(|&i| a.gt_inds[i] > 0).collect();
    let neg_inds = (0..a.gt_inds.len())
        .filter(|&i| a.gt_inds[i] == 0)
        .collect();
    let pos_assigned_gt_inds = pos_inds
        .iter()
        .map(|&i| (a.gt_inds[i] - 1) as usize)
        .collect();
    SamplingResult {
        pos_inds,
        neg_inds,
        pos_assigned_gt_inds,
        num_gts_added: 0,
    }
}

/// `type = "RandomSampler"`: at most `num · pos_fraction` positives chosen uniformly, the rest of
/// `num` negatives (at most `neg_pos_ub · max(1, #pos)` when `neg_pos_ub ≥ 0`); with
/// `add_gt_as_proposals` the gt boxes are prepended to the priors as positives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSampler {
    /// Total samples per image.
    pub num: usize,
    /// Target fraction of positives.
    pub pos_fraction: f64,
    /// Upper bound of negatives per positive (−1: none).
    #[serde(default = "d::neg_one_f64")]
    pub neg_pos_ub: f64,
    /// Prepend the gt boxes to the priors.
    #[serde(default = "d::yes")]
    pub add_gt_as_proposals: bool,
}

impl RandomSampler {
    /// Draws the samples from the candidate positives `pos` and negatives `neg` (any index
    /// space): at most `num · pos_fraction` positives, then at most `num − #pos` negatives
    /// (bounded by `neg_pos_ub`), each drawn uniformly without replacement when there are more
    /// candidates than places. Both lists come back sorted ascending, as mmdetection's
    /// `unique()` returns them.
    pub fn choose(
        &self,
        mut pos: Vec<usize>,
        mut neg: Vec<usize>,
        rng: &mut impl Rng,
    ) -> (Vec<usize>, Vec<usize>) {
        let num_pos = (self.num as f64 * self.pos_fraction) as usize;
        if pos.len() > num_pos {
            pos.shuffle(rng);
            pos.truncate(num_pos);
        }
        let mut num_neg = self.num - pos.len();
        if self.neg_pos_ub >= 0.0 {
            num_neg = num_neg.min((self.neg_pos_ub * pos.len().max(1) as f64) as usize);
        }
        if neg.len() > num_neg {
            neg.shuffle(rng);
            neg.truncate(num_neg);
        }
        pos.sort_unstable();
        neg.sort_unstable();
        (pos, neg)
    }

    /// Samples from `a`. With `add_gt_as_proposals` (and gts present) the returned indices refer to
    /// the priors with the `num_gts` gt boxes prepended (the caller prepends them as well), and
    /// `a` is extended accordingly (mmdetection's `add_gt_`).
    pub fn sample(
        &self,
        a: &mut AssignResult,
        gt_labels: &[i64],
        rng: &mut impl Rng,
    ) -> SamplingResult {
        let mut added = 0;
        if self.add_gt_as_proposals && a.num_gts > 0 {
            added = a.num_gts;
            let mut gi: Vec<i64> = (1..=a.num_gts as i64).collect();
            gi.extend_from_slice(&a.gt_inds);
            a.gt_inds = gi;
            let mut mo = vec![1.0f32; a.num_gts];
            mo.extend_from_slice(&a.max_overlaps);
            a.max_overlaps = mo;
            let mut lb = gt_labels.to_vec();
            lb.extend_from_slice(&a.labels);
            a.labels = lb;
        }
        let pos: Vec<usize> = (0..a.gt_inds.len()).filter(|&i| a.gt_inds[i] > 0).collect();
        let neg: Vec<usize> = (0..a.gt_inds.len())
            .filter(|&i| a.gt_inds[i] == 0)
            .collect();
        let (pos, neg) = self.choose(pos, neg, rng);
        let pos_assigned_gt_inds = pos.iter().map(|&i| (a.gt_inds[i] - 1) as usize).collect();
        SamplingResult {
            pos_inds: pos,
            neg_inds: neg,
            pos_assigned_gt_inds,
            num_gts_added: added,
        }
    }
}

densepred_core::config_by_type! {
    /// `train_cfg.sampler` of a sampling head (RPN, R-CNN): mmdetection's `RandomSampler`.
    pub enum SamplerConfig {
        /// mmdetection's `RandomSampler`.
        "RandomSampler" => RandomSampler(RandomSampler),
    }
}
