//! The set of the `k` smallest values exactly as PyTorch's CPU `torch.topk(largest=False)` picks it,
//! ties included.
//!
//! ATSS selects, per level and GT box, the `k` priors whose centres are closest to the GT centre.
//! On a regular anchor grid, distances tie exactly (symmetric positions), so *which* of the tied
//! priors is a candidate depends on the selection algorithm. PyTorch's CPU kernel
//! (`aten/src/ATen/native/cpu/SortingKernel.cpp`, `topk_impl_loop`) copies `(value, index)` pairs
//! in index order and runs `std::partial_sort` when `k·64 ≤ n`, else `std::nth_element`, with a
//! comparator on the value only. The official wheels are built with GCC, so this module replays
//! libstdc++'s algorithms step by step (heap select with `__adjust_heap`/`__push_heap`, and
//! introselect with median-of-three pivots and a final insertion sort) to land on the same set.

type Item = (f32, usize);

fn less(a: &Item, b: &Item) -> bool {
    a.0 < b.0
}

fn push_heap(v: &mut [Item], mut hole: usize, top: usize, value: Item) {
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && less(&v[parent], &value) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[hole] = value;
}

fn adjust_heap(v: &mut [Item], mut hole: usize, len: usize, value: Item) {
    let top = hole;
    let mut second = hole;
    while len >= 1 && second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if less(&v[second], &v[second - 1]) {
            second -= 1;
        }
        v[hole] = v[second];
        hole = second;
    }
    if len & 1 == 0 && len >= 2 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[hole] = v[second - 1];
        hole = second - 1;
    }
    push_heap(v, hole, top, value);
}

fn make_heap(v: &mut [Item]) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, len, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// libstdc++ `__heap_select(first, middle, last)`: afterwards `v[..middle]` holds the `middle`
/// smallest (as a max-heap).
fn heap_select(v: &mut [Item], middle: usize) {
    make_heap(&mut v[..middle]);
    for i in middle..v.len() {
        if less(&v[i], &v[0]) {
            let value = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, middle, value);
        }
    }
}

fn move_median_to_first(v: &mut [Item], result: usize, a: usize, b: usize, c: usize) {
    let pick = if less(&v[a], &v[b]) {
        if less(&v[b], &v[c]) {
            b
        } else if less(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if less(&v[a], &v[c]) {
        a
    } else if less(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

fn unguarded_partition(v: &mut [Item], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while less(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while less(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn insertion_sort(v: &mut [Item], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        let val = v[i];
        if less(&val, &v[first]) {
            v.copy_within(first..i, first + 1);
            v[first] = val;
        } else {
            let mut j = i;
            while less(&val, &v[j - 1]) {
                v[j] = v[j - 1];
                j -= 1;
            }
            v[j] = val;
        }
    }
}

/// libstdc++ `std::nth_element` (introselect).
fn nth_element(v: &mut [Item], nth: usize) {
    let (mut first, mut last) = (0usize, v.len());
    if first == last || nth == last {
        return;
    }
    let mut depth = 2 * (usize::BITS - 1 - (last - first).leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut v[first..last], nth - first + 1);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1);
        let cut = unguarded_partition(v, first + 1, last, first);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(v, first, last);
}

/// Indices of the `k` smallest of `values` (the set PyTorch's CPU `topk(k, largest=False)`
/// returns), sorted ascending by index. `k` is clamped to `values.len()`.
pub fn torch_topk_smallest(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return vec![];
    }
    let mut v: Vec<Item> = values.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        heap_select(&mut v, k);
    } else {
        nth_element(&mut v, k - 1);
    }
    let mut idx: Vec<usize> = v[..k].iter().map(|p| p.1).collect();
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_full_sort_without_ties() {
        let vals: Vec<f32> = (0..500).map(|i| ((i * 7919) % 1013) as f32).collect();
        for k in [1, 3, 7, 9, 100, 499, 500] {
            let mut want: Vec<usize> = (0..500).collect();
            want.sort_by(|&a, &b| vals[a].total_cmp(&vals[b]));
            want.truncate(k);
            want.sort_unstable();
            assert_eq!(torch_topk_smallest(&vals, k), want, "k={k}");
        }
    }

    #[test]
    fn ties_follow_pytorch() {
        // Cases recorded from torch.topk on CPU by tests/data/make_topk_ties.py.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/topk_ties.json");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = meta["cases"].as_array().unwrap();
        assert!(cases.len() >= 30);
        for (c, case) in cases.iter().enumerate() {
            let values: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let k = case["k"].as_u64().unwrap() as usize;
            let want: Vec<usize> = case["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                torch_topk_smallest(&values, k),
                want,
                "case {c} (n={}, k={k})",
                values.len()
            );
        }
    }
}
