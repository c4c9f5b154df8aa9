//! A minute's batch: its lines (valid records plus any configured bad and
//! empty lines), the decompressed text and the bzip2 file as served.
//!
//! Pure and deterministic: the same ([`BatchSettings`], minute) gives the
//! same lines and byte-identical files. Tests use [`batch_lines`] as the
//! exact expectation of what a worker must publish or reject.
//!
//! The text is every line followed by `\n`. A multi-stream file is the text
//! cut at arbitrary byte offsets (mid-line too), each part compressed as its
//! own bzip2 stream, the streams concatenated.

use std::io::Write;

use bzip2::Compression;
use bzip2::write::BzEncoder;

use crate::minute::Minute;

use super::records::{IdStyle, RecordPlan, TemplateId, UNDERSCORE_SANDBOX};
use super::rng::{SimRng, unit_for};
use super::settings::BatchSettings;

/// What a line is, i.e. what a correct worker does with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A record to publish, keyed by `id`; `sha256` is the id up to its first `_`.
    Valid {
        id: String,
        sha256: String,
        sandbox: String,
    },
    /// A blank line (skipped, not an error).
    Empty,
    /// Bytes that are not UTF-8.
    NotUtf8,
    /// JSON that is not an object (`[1, 2]`, `"file_behaviour"`) or not JSON at all (a cut record).
    NotJsonObject,
    /// An object with no `id`, or one not of the form `<64 lowercase hex>_<sandbox>`.
    BadId,
    /// A valid record longer than [`BatchSettings::oversize_line_bytes`].
    TooLarge,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedLine {
    /// 1-based line number in the decompressed text.
    pub number: usize,
    /// The line without its `\n`.
    pub bytes: Vec<u8>,
    pub kind: LineKind,
}

/// Number of valid records in the minute's batch.
pub fn record_count(settings: &BatchSettings, m: Minute) -> usize {
    let base = f64::from(settings.records_per_minute);
    let v = settings.records_variation.get();
    let u = unit_for(settings.seed, &[0xC0u64, m.unix_minutes() as u64]) * 2.0 - 1.0;
    (base * (1.0 + v * u)).round().max(0.0) as usize
}

/// Every line of the minute's batch, in file order.
pub fn batch_lines(settings: &BatchSettings, m: Minute) -> Vec<GeneratedLine> {
    let minute = m.unix_minutes();
    let n = record_count(settings, m);
    let mut rng = SimRng::derive(settings.seed, &[0xBA7C, minute as u64]);
    // Every batch of 3+ records has a sandbox name holding `_`, so splitting
    // ids at the first underscore is always exercised.
    let underscore_at = (n >= 3).then(|| rng.below(n));
    let mut lines: Vec<(Vec<u8>, LineKind)> = (0..n)
        .map(|i| {
            let mut plan = RecordPlan::new(settings.seed, minute, i as u64);
            if Some(i) == underscore_at {
                plan = plan.with_sandbox(UNDERSCORE_SANDBOX);
            }
            valid_line(&plan)
        })
        .collect();
    let mut extras = Vec::new();
    if settings.has(&settings.bad_lines, "bad-lines", m) {
        extras.extend(bad_lines(settings, minute));
    }
    if settings.has(&settings.empty_lines, "empty-lines", m) {
        extras.extend((0..1 + rng.below(3)).map(|_| (Vec::new(), LineKind::Empty)));
    }
    for extra in extras {
        let at = rng.below(lines.len() + 1);
        lines.insert(at, extra);
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, (bytes, kind))| GeneratedLine {
            number: i + 1,
            bytes,
            kind,
        })
        .collect()
}

/// The decompressed content of the minute's file.
pub fn batch_text(settings: &BatchSettings, m: Minute) -> Vec<u8> {
    join_lines(&batch_lines(settings, m))
}

/// Every line followed by `\n`.
pub fn join_lines(lines: &[GeneratedLine]) -> Vec<u8> {
    let mut text = Vec::with_capacity(lines.iter().map(|l| l.bytes.len() + 1).sum());
    for line in lines {
        text.extend_from_slice(&line.bytes);
        text.push(b'\n');
    }
    text
}

/// The exact bytes the download listener serves for the minute (before transport faults).
pub fn batch_file(settings: &BatchSettings, m: Minute) -> Vec<u8> {
    compress_batch(settings, m, &batch_text(settings, m))
}

/// Compresses a batch's text: one bzip2 stream, or several for multi-stream minutes.
pub fn compress_batch(settings: &BatchSettings, m: Minute, text: &[u8]) -> Vec<u8> {
    if !settings.has(&settings.multi_stream, "multi-stream", m) || text.len() < 2 {
        return bzip2(text);
    }
    let mut rng = SimRng::derive(settings.seed, &[0x3517, m.unix_minutes() as u64]);
    let mut cuts: Vec<usize> = (0..1 + rng.below(3))
        .map(|_| 1 + rng.below(text.len() - 1))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut file = Vec::new();
    let mut start = 0;
    for end in cuts.into_iter().chain([text.len()]) {
        file.extend_from_slice(&bzip2(&text[start..end]));
        start = end;
    }
    file
}

/// bzip2 at level 9 (900 KB blocks), as upstream.
pub fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut encoder = BzEncoder::new(Vec::with_capacity(data.len() / 8 + 64), Compression::best());
    // Writing into a Vec cannot fail, and libbz2 only errs on misuse of its API.
    encoder.write_all(data).expect("bzip2 into memory");
    encoder.finish().expect("bzip2 into memory")
}

fn valid_line(plan: &RecordPlan) -> (Vec<u8>, LineKind) {
    let mut bytes = Vec::new();
    plan.write(&mut bytes);
    let kind = LineKind::Valid {
        id: plan.id(),
        sha256: plan.sha256.clone(),
        sandbox: plan.sandbox.to_string(),
    };
    (bytes, kind)
}

/// One line of each way a batch can be wrong.
fn bad_lines(settings: &BatchSettings, minute: i64) -> Vec<(Vec<u8>, LineKind)> {
    // Indexes far above any record count, so bad lines never repeat a valid record.
    let plan = |k: u64| {
        RecordPlan::new(settings.seed, minute, 1 << 40 | k).with_body(TemplateId::SafeBrowsing, 0.5)
    };
    let written = |plan: RecordPlan| {
        let mut out = Vec::new();
        plan.write(&mut out);
        out
    };

    let mut not_utf8 = written(plan(0));
    let marker = b"\"file_type_tag\": \"";
    let at = find(&not_utf8, marker).map_or(not_utf8.len() / 2, |i| i + marker.len());
    // Latin-1 "été": 0xE9 starts a 3-byte UTF-8 sequence that never completes.
    not_utf8.splice(at..at, *b"\xe9t\xe9 ");

    let mut cut = written(plan(1));
    cut.truncate(cut.len() * 2 / 3);

    let mut lines = vec![
        (not_utf8, LineKind::NotUtf8),
        (b"[1, 2]".to_vec(), LineKind::NotJsonObject),
        (b"\"file_behaviour\"".to_vec(), LineKind::NotJsonObject),
        (cut, LineKind::NotJsonObject),
    ];
    let styles = [
        IdStyle::UppercaseHex,
        IdStyle::ShortHex,
        IdStyle::NoUnderscore,
        IdStyle::Missing,
    ];
    for (k, style) in (2..).zip(styles) {
        lines.push((written(plan(k).with_id_style(style)), LineKind::BadId));
    }
    lines.push((oversize_line(settings, minute), LineKind::TooLarge));
    lines
}

/// A big record repeated until it is over the limit.
fn oversize_line(settings: &BatchSettings, minute: i64) -> Vec<u8> {
    const ZENBOX_BYTES: f64 = 150_000.0;
    let limit = settings.oversize_line_bytes;
    let mut scale = limit as f64 / ZENBOX_BYTES * 1.05 + 0.05;
    loop {
        let plan =
            RecordPlan::new(settings.seed, minute, 1 << 41).with_body(TemplateId::Zenbox, scale);
        let mut out = Vec::with_capacity(limit + limit / 8);
        plan.write(&mut out);
        if out.len() > limit {
            return out;
        }
        scale *= 1.25;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Instant;

    use bzip2::read::{BzDecoder, MultiBzDecoder};

    use super::*;
    use crate::sim::vt::settings::MinuteSet;

    fn m(s: &str) -> Minute {
        Minute::parse(s).unwrap()
    }

    fn decode(file: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        MultiBzDecoder::new(file).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn same_settings_and_minute_give_identical_bytes() {
        let s = BatchSettings::exact(3, 8);
        let a = batch_file(&s, m("202611230900"));
        assert_eq!(a, batch_file(&s, m("202611230900")));
        assert_ne!(a, batch_file(&s, m("202611230901")));
        assert_ne!(
            a,
            batch_file(&BatchSettings::exact(4, 8), m("202611230900"))
        );
        assert_eq!(decode(&a), batch_text(&s, m("202611230900")));
    }

    #[test]
    fn counts_vary_by_minute_unless_exact() {
        let exact = BatchSettings::exact(1, 50);
        assert!((0..20).all(|i| record_count(&exact, m("202611230900").plus(i)) == 50));
        let varied = BatchSettings {
            records_per_minute: 100,
            ..BatchSettings::default()
        };
        let counts: Vec<usize> = (0..200)
            .map(|i| record_count(&varied, m("202611230900").plus(i)))
            .collect();
        assert!(counts.iter().all(|c| (70..=130).contains(c)), "{counts:?}");
        assert!(counts.iter().min() < Some(&80) && counts.iter().max() > Some(&120));
    }

    #[test]
    fn valid_lines_carry_their_identity() {
        let lines = batch_lines(&BatchSettings::exact(5, 12), m("202611230900"));
        assert_eq!(lines.len(), 12);
        let mut underscored = 0;
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line.number, i + 1);
            let LineKind::Valid {
                id,
                sha256,
                sandbox,
            } = &line.kind
            else {
                panic!("line {} is {:?}", line.number, line.kind)
            };
            let v: serde_json::Value = serde_json::from_slice(&line.bytes).unwrap();
            assert_eq!(v["id"], id.as_str());
            assert_eq!(id.split_once('_').unwrap().0, sha256);
            assert_eq!(id, &format!("{sha256}_{sandbox}"));
            underscored += usize::from(sandbox.contains('_'));
        }
        assert!(underscored >= 1);
    }

    #[test]
    fn bad_and_empty_lines_are_what_they_claim() {
        let target = m("202611230900");
        let s = BatchSettings {
            bad_lines: MinuteSet::minute(target),
            empty_lines: MinuteSet::minute(target),
            oversize_line_bytes: 200_000,
            ..BatchSettings::exact(9, 6)
        };
        let lines = batch_lines(&s, target);
        let count = |k: &LineKind| lines.iter().filter(|l| &l.kind == k).count();
        assert_eq!(count(&LineKind::NotUtf8), 1);
        assert_eq!(count(&LineKind::NotJsonObject), 3);
        assert_eq!(count(&LineKind::BadId), 4);
        assert_eq!(count(&LineKind::TooLarge), 1);
        assert!((1..=3).contains(&count(&LineKind::Empty)));
        for line in &lines {
            let parsed = serde_json::from_slice::<serde_json::Value>(&line.bytes);
            match &line.kind {
                LineKind::Valid { .. } => {
                    assert!(line.bytes.len() <= 200_000 && parsed.unwrap().is_object())
                }
                LineKind::Empty => assert!(line.bytes.is_empty()),
                LineKind::NotUtf8 => assert!(std::str::from_utf8(&line.bytes).is_err()),
                LineKind::NotJsonObject => assert!(!parsed.is_ok_and(|v| v.is_object())),
                LineKind::BadId => {
                    let v = parsed.unwrap();
                    let sha = v
                        .get("id")
                        .and_then(|id| id.as_str())
                        .and_then(|id| id.split_once('_'))
                        .map(|p| p.0);
                    let good = sha.is_some_and(|h| {
                        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                    });
                    assert!(!good, "{}", String::from_utf8_lossy(&line.bytes[..200]));
                }
                LineKind::TooLarge => {
                    assert!(line.bytes.len() > 200_000 && parsed.unwrap().is_object())
                }
            }
        }
        // Other minutes are clean.
        assert!(
            batch_lines(&s, target.next())
                .iter()
                .all(|l| matches!(l.kind, LineKind::Valid { .. }))
        );
    }

    #[test]
    fn multi_stream_files_decode_to_the_lines() {
        let target = m("202611230900");
        let s = BatchSettings {
            multi_stream: MinuteSet::minute(target),
            ..BatchSettings::exact(2, 10)
        };
        let file = batch_file(&s, target);
        let expected = join_lines(&batch_lines(&s, target));
        assert_eq!(decode(&file), expected);
        let mut first_stream = Vec::new();
        BzDecoder::new(&file[..])
            .read_to_end(&mut first_stream)
            .unwrap();
        assert!(
            first_stream.len() < expected.len(),
            "the file should hold several streams"
        );
        assert!(expected.starts_with(&first_stream));
        assert_eq!(
            decode(&batch_file(&s, target.next())),
            batch_text(&s, target.next())
        );
    }

    /// Ratio and size mix over a realistic batch. The 5 real records
    /// compress 8.6:1; real batches are required to land within 8..12.
    #[test]
    fn size_mix_and_compression_ratio_are_realistic() {
        let s = BatchSettings::exact(11, 120);
        let lines = batch_lines(&s, m("202611230900"));
        let text = join_lines(&lines);
        let file = compress_batch(&s, m("202611230900"), &text);
        let ratio = text.len() as f64 / file.len() as f64;
        assert!((8.0..=12.0).contains(&ratio), "ratio {ratio:.2}");
        let mut sizes: Vec<usize> = lines.iter().map(|l| l.bytes.len()).collect();
        sizes.sort_unstable();
        assert!(sizes[0] >= 1_000 && sizes[0] < 2_500, "{sizes:?}");
        assert!(
            *sizes.last().unwrap() > 80_000 && *sizes.last().unwrap() < 160_000,
            "{sizes:?}"
        );
        let median = sizes[sizes.len() / 2];
        assert!((2_500..12_000).contains(&median), "median {median}");
    }

    /// `cargo test --release --lib measure_generation -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement, prints numbers"]
    fn measure_generation() {
        for n in [20, 100, 625] {
            let s = BatchSettings::exact(1, n);
            let start = Instant::now();
            let mut total = (0usize, 0usize);
            let mut sizes = Vec::new();
            for i in 0..5 {
                let minute = m("202611230900").plus(i);
                let lines = batch_lines(&s, minute);
                sizes.extend(lines.iter().map(|l| l.bytes.len()));
                let text = join_lines(&lines);
                let t = Instant::now();
                let file = compress_batch(&s, minute, &text);
                if i == 0 {
                    println!(
                        "  compress {:.0} MB/s",
                        text.len() as f64 / t.elapsed().as_secs_f64() / 1e6
                    );
                }
                total.0 += text.len();
                total.1 += file.len();
            }
            let secs = start.elapsed().as_secs_f64();
            sizes.sort_unstable();
            let pct = |p: f64| sizes[((sizes.len() - 1) as f64 * p) as usize];
            println!(
                "n={n}: {:.1} MB text, ratio {:.2}, {:.2} s/minute, {:.1} MB/s; line p0 {} p10 {} p50 {} p90 {} p99 {} max {} mean {}",
                total.0 as f64 / 5e6,
                total.0 as f64 / total.1 as f64,
                secs / 5.0,
                total.0 as f64 / secs / 1e6,
                pct(0.0),
                pct(0.1),
                pct(0.5),
                pct(0.9),
                pct(0.99),
                pct(1.0),
                sizes.iter().sum::<usize>() / sizes.len(),
            );
        }
    }
}
