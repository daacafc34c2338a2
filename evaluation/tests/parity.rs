//! Parity with pycocotools and mmsegmentation on `../shared/fixtures/eval/` (see its README):
//! every expected value within 1e-6.

use densepred_evaluation::coco::{evaluate_results_file, load_gt, CocoIouType};
use densepred_evaluation::semseg::IoUMetric;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6
}

#[test]
fn coco_cases_match_pycocotools() {
    let mut checked = 0;
    for (case, types) in [
        ("bbox", &["bbox"][..]),
        ("segm", &["segm", "bbox"]),
        ("edge_bbox", &["bbox"]),
        ("edge_segm", &["segm", "bbox"]),
    ] {
        let d = densepred_testutil::fixtures_dir("eval")
            .join("coco")
            .join(case);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap())
                .unwrap();
        let gt = load_gt(&d.join("gt.json")).unwrap();
        for &t in types {
            let s =
                evaluate_results_file(&gt, &d.join("dets.json"), t.parse::<CocoIouType>().unwrap())
                    .unwrap();
            let want: Vec<f64> = expected[t]["pycocotools"]["stats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(s.stats.len(), want.len(), "{case}/{t} stats");
            for (i, (&g, &w)) in s.stats.iter().zip(&want).enumerate() {
                assert!(close(g, w), "{case}/{t}: stat {i} = {g}, pycocotools {w}");
            }
            let per = expected[t]["pycocotools"]["per_category"]
                .as_array()
                .unwrap();
            assert_eq!(per.len(), s.per_category.len(), "{case}/{t} categories");
            for (row, got) in per.iter().zip(&s.per_category) {
                for (key, g) in [("AP", got.ap), ("AP50", got.ap50), ("AP75", got.ap75)] {
                    match (row[key].as_f64(), g) {
                        (None, None) => {}
                        (Some(w), Some(g)) => {
                            assert!(close(g, w), "{case}/{t} {} {key}: {g} vs {w}", got.name)
                        }
                        (w, g) => panic!("{case}/{t} {} {key}: {g:?} vs {w:?}", got.name),
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn semseg_matches_mmseg_iou_metric() {
    let t = candle_core::safetensors::load(
        densepred_testutil::fixtures_dir("eval").join("semseg/ade_like.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            densepred_testutil::fixtures_dir("eval").join("semseg/expected.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut m = IoUMetric::new(150, 255);
    for i in 0..4 {
        let gt: Vec<u8> = t[&format!("gt_label_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let pred: Vec<u8> = t[&format!("pred_label_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // reduce_zero_label applied to the raw map gives the fixture's ground truth.
        let mut raw: Vec<u8> = t[&format!("raw_label_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        densepred_evaluation::semseg::reduce_zero_label(&mut raw);
        assert_eq!(raw, gt);
        m.update(&gt, &pred).unwrap();
    }
    let r = m.compute();
    let f64s = &expected["f64"];
    let arr = |k: &str| -> Vec<Option<f64>> {
        f64s[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64())
            .collect()
    };
    for (name, got) in [("IoU", &r.iou), ("Acc", &r.acc)] {
        let want = arr(name);
        assert_eq!(want.len(), 150);
        assert_eq!(got.len(), want.len(), "{name}");
        for (c, (w, &g)) in want.iter().zip(got).enumerate() {
            match w {
                None => assert!(g.is_nan(), "{name}[{c}] should be NaN, got {g}"),
                Some(w) => assert!(close(g, *w), "{name}[{c}]: {g} vs {w}"),
            }
        }
    }
    let scalar = |k: &str| f64s[k].as_f64().unwrap();
    assert!(
        close(r.a_acc, scalar("aAcc")),
        "aAcc {} vs {}",
        r.a_acc,
        scalar("aAcc")
    );
    assert!(
        close(r.m_iou, scalar("mIoU")),
        "mIoU {} vs {}",
        r.m_iou,
        scalar("mIoU")
    );
    assert!(
        close(r.m_acc, scalar("mAcc")),
        "mAcc {} vs {}",
        r.m_acc,
        scalar("mAcc")
    );
    assert_eq!(r.iou.iter().filter(|v| !v.is_nan()).count(), 51);
}

/// Detections built in memory (xyxy boxes, labels, row-major masks) convert to COCO results that
/// evaluate to pycocotools' numbers, and dump to JSON files that evaluate the same.
#[test]
fn in_memory_detections_round_trip() {
    use densepred_evaluation::coco::{
        dump_results, evaluate_records, to_coco_results, ImageDetections,
    };
    let d = densepred_testutil::fixtures_dir("eval").join("coco/segm");
    let gt = load_gt(&d.join("gt.json")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.join("dets.json")).unwrap()).unwrap();
    let mut cat_ids: Vec<u64> = gt.dataset.categories.iter().map(|c| c.id).collect();
    cat_ids.sort();
    let mut per_image: std::collections::BTreeMap<u64, ImageDetections> = Default::default();
    for r in &raw {
        let img = r["image_id"].as_u64().unwrap();
        let im = gt.get_img(img).unwrap();
        let (h, w) = (im.height, im.width);
        let e = per_image.entry(img).or_insert_with(|| ImageDetections {
            image_id: img,
            boxes: vec![],
            scores: vec![],
            labels: vec![],
            masks: Some((vec![], (h, w))),
        });
        let b: Vec<f32> = r["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        e.boxes.push([b[0], b[1], b[0] + b[2], b[1] + b[3]]);
        e.scores.push(r["score"].as_f64().unwrap() as f32);
        e.labels.push(
            cat_ids
                .iter()
                .position(|&c| c == r["category_id"].as_u64().unwrap())
                .unwrap(),
        );
        let rle =
            hotcoco::mask::rle_from_string(r["segmentation"]["counts"].as_str().unwrap(), h, w)
                .unwrap();
        let col = hotcoco::mask::decode(&rle);
        let mut row = vec![0u8; col.len()];
        for x in 0..w as usize {
            for y in 0..h as usize {
                row[y * w as usize + x] = col[x * h as usize + y];
            }
        }
        e.masks.as_mut().unwrap().0.push(row);
    }
    // Keep the file's detection order within each image (pycocotools' tie order).
    let dets: Vec<ImageDetections> = per_image.into_values().collect();
    let (bbox, segm) = to_coco_results(&dets, &cat_ids).unwrap();
    let segm = segm.unwrap();
    let s = evaluate_records(&gt, &segm, CocoIouType::Segm).unwrap();
    let want: Vec<f64> = expected["segm"]["pycocotools"]["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(s.stats.len(), want.len(), "segm stats");
    for (g, w) in s.stats.iter().zip(&want) {
        assert!(close(*g, *w), "segm {g} vs {w}");
    }
    let out = std::env::temp_dir().join(format!("dp_results_{}", std::process::id()));
    let files = dump_results(&out, &bbox, Some(&segm)).unwrap();
    assert_eq!(files.len(), 2);
    let s2 = evaluate_results_file(&gt, &files[1], CocoIouType::Segm).unwrap();
    assert_eq!(s2.stats, s.stats);
    let sb = evaluate_results_file(&gt, &files[0], CocoIouType::Bbox).unwrap();
    let want_b: Vec<f64> = expected["bbox"]["pycocotools"]["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(sb.stats.len(), want_b.len(), "bbox stats");
    for (g, w) in sb.stats.iter().zip(&want_b) {
        assert!(close(*g, *w), "bbox {g} vs {w}");
    }
    for f in files {
        std::fs::remove_file(f).unwrap();
    }
    // A label without a category is an error naming the image and detection.
    let bad = vec![ImageDetections {
        image_id: 1,
        boxes: vec![[0.0, 0.0, 1.0, 1.0]],
        scores: vec![0.5],
        labels: vec![99],
        masks: None,
    }];
    assert!(to_coco_results(&bad, &cat_ids)
        .unwrap_err()
        .to_string()
        .contains("label 99"));
}
