//! One synthetic file-behaviour record, built from the five real records in
//! `fixtures/vt-file-behaviour-sample.jsonl`.
//!
//! A record keeps a template's structure and wording (paths, registry keys,
//! signature texts) but gets a fresh identity (SHA256, MD5, SHA1, sandbox,
//! analysis date, artifact tokens), its big attribute lists subsampled or
//! repeated to reach a target size, and every long hex run and digit run in
//! its strings replaced. Replacements are keyed by (record, original text),
//! so a PID or dropped-file hash that repeats inside a record stays
//! consistent, while different records differ: that is what makes batches
//! compress like real ones (about 10:1) instead of like copies (50:1).
//!
//! Pure and deterministic: the same (seed, minute, index) gives the same bytes.

use std::sync::LazyLock;

use super::json::{Node, write_key, write_node, write_plain, write_str};
use super::rng::{SimRng, hash_bytes, mix};

const FIXTURE: &[u8] = include_bytes!("../../../fixtures/vt-file-behaviour-sample.jsonl");
const API: &str = "https://www.virustotal.com/api/v3";

/// Sandbox names seen in the feed, with a synthetic one holding `_`: the
/// SHA256 must be split off the id at the *first* underscore.
pub const SANDBOXES: [&str; 10] = [
    "Zenbox",
    "VirusTotal Jujubox",
    "VirusTotal Observer",
    "Microsoft Sysinternals",
    "CAPE Sandbox",
    "Rising MOVES",
    "Google Safe Browsing",
    "C2AE",
    "VirusTotal R2DBox",
    UNDERSCORE_SANDBOX,
];
const SANDBOX_WEIGHTS: [u32; 10] = [20, 15, 12, 10, 10, 8, 8, 6, 6, 5];
pub const UNDERSCORE_SANDBOX: &str = "CAPE_Sandbox";

const FILE_TYPES: [&str; 12] = [
    "peexe",
    "pedll",
    "pdf",
    "msi",
    "powershell",
    "doc",
    "docx",
    "xlsx",
    "zip",
    "javascript",
    "html",
    "android",
];
const FILE_TYPE_WEIGHTS: [u32; 12] = [30, 12, 12, 5, 5, 6, 6, 5, 7, 4, 4, 4];

/// One of the real records, parsed once.
pub struct Template {
    attributes: Vec<(String, Node)>,
}

/// Index into [`templates`]: the order of the fixture file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateId {
    /// 153 KB, mostly memory dumps and file lists.
    Zenbox = 0,
    /// 8 KB of registry and file activity.
    Rising = 1,
    /// 1.9 KB: a list of dropped-file hashes.
    SafeBrowsing = 2,
    /// 6 KB of Sigma results.
    Observer = 4,
}

static TEMPLATES: LazyLock<Vec<Template>> = LazyLock::new(|| {
    FIXTURE
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            // The fixture is compiled in; a unit test parses it, so this cannot fail at run time.
            let node: Node = serde_json::from_slice(line).expect("embedded fixture is valid JSON");
            let attributes = match node.get("attributes") {
                Some(Node::Obj(fields)) => fields.clone(),
                _ => Vec::new(),
            };
            Template { attributes }
        })
        .collect()
});

pub fn templates() -> &'static [Template] {
    &TEMPLATES
}

/// How the `id` of a record is spelt: right, or wrong in one of the ways the
/// worker must refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdStyle {
    Valid,
    UppercaseHex,
    ShortHex,
    NoUnderscore,
    Missing,
}

/// Everything that identifies one record; the body comes from `template`.
pub struct RecordPlan {
    pub sha256: String,
    pub sandbox: &'static str,
    pub id_style: IdStyle,
    template: TemplateId,
    scale: f64,
    salt: u64,
    md5: String,
    sha1: String,
    file_type_tag: &'static str,
    analysis_date: i64,
    last_modification_date: i64,
    artifacts: [bool; 4],
    token: String,
}

/// Size classes: (weight, template, scale range). Scale multiplies the big
/// attribute lists; below 1 it subsamples them, above 1 it repeats them.
/// The mix gives a median around 5 KB, a mean around 17 KB and a tail up to
/// the 153 KB of the largest real record.
const SIZE_MIX: [(u32, TemplateId, f64, f64); 5] = [
    (34, TemplateId::SafeBrowsing, 0.8, 2.5),
    (22, TemplateId::Rising, 0.3, 1.0),
    (20, TemplateId::Observer, 0.3, 1.0),
    (18, TemplateId::Zenbox, 0.03, 0.45),
    (6, TemplateId::Zenbox, 0.55, 1.0),
];

impl RecordPlan {
    /// The record at `index` of the batch of minute `minute_unix_minutes`.
    pub fn new(seed: u64, minute_unix_minutes: i64, index: u64) -> RecordPlan {
        let mut rng = SimRng::derive(seed, &[minute_unix_minutes as u64, index]);
        let class = SIZE_MIX[rng.weighted(&SIZE_MIX.map(|c| c.0))];
        let (_, template, lo, hi) = class;
        let scale = rng.range_f64(lo, hi);
        let sandbox = SANDBOXES[rng.weighted(&SANDBOX_WEIGHTS)];
        let analysis_date = minute_unix_minutes * 60 + rng.below(60) as i64;
        let last_modification_date = analysis_date + 2 + rng.below(90) as i64;
        // Big reports usually come with artifacts, small ones rarely.
        let p_artifact = if template == TemplateId::Zenbox {
            0.8
        } else {
            0.15
        };
        let artifacts = [(); 4].map(|_| rng.chance(p_artifact));
        let sha256 = rng.hex(64);
        let mut plan = RecordPlan {
            sandbox,
            id_style: IdStyle::Valid,
            template,
            scale,
            salt: rng.next_u64(),
            md5: rng.hex(32),
            sha1: rng.hex(40),
            file_type_tag: FILE_TYPES[rng.weighted(&FILE_TYPE_WEIGHTS)],
            analysis_date,
            last_modification_date,
            artifacts,
            token: String::new(),
            sha256,
        };
        let signature = rng.hex(64);
        let published = last_modification_date + 3600 + rng.below(90) as i64;
        plan.token = super::rng::base64_url(
            format!("{}||v3||{published}||{signature}", plan.id()).as_bytes(),
        );
        plan
    }

    pub fn with_sandbox(mut self, sandbox: &'static str) -> RecordPlan {
        self.sandbox = sandbox;
        self
    }

    pub fn with_id_style(mut self, style: IdStyle) -> RecordPlan {
        self.id_style = style;
        self
    }

    /// Forces the template and scale (small bad lines, the oversize line).
    pub fn with_body(mut self, template: TemplateId, scale: f64) -> RecordPlan {
        self.template = template;
        self.scale = scale;
        self
    }

    /// `<sha256>_<sandbox>`, or its broken form.
    pub fn id(&self) -> String {
        match self.id_style {
            IdStyle::Valid | IdStyle::Missing => format!("{}_{}", self.sha256, self.sandbox),
            IdStyle::UppercaseHex => {
                format!("{}_{}", self.sha256.to_ascii_uppercase(), self.sandbox)
            }
            IdStyle::ShortHex => format!("{}_{}", &self.sha256[..40], self.sandbox),
            IdStyle::NoUnderscore => {
                format!("{}{}", self.sha256, self.sandbox.replace([' ', '_'], ""))
            }
        }
    }

    /// Writes the record as one line (without the newline).
    pub fn write(&self, out: &mut Vec<u8>) {
        let id = self.id();
        let self_link = format!("{API}/file_behaviours/{id}");
        out.push(b'{');
        if self.id_style != IdStyle::Missing {
            write_key(out, "id");
            write_str(out, &id);
            out.extend_from_slice(b", ");
        }
        write_key(out, "type");
        write_str(out, "file_behaviour");
        out.extend_from_slice(b", ");
        write_key(out, "links");
        write_plain(out, &Node::obj([("self", Node::str(&self_link))]));
        out.extend_from_slice(b", ");
        write_key(out, "attributes");
        self.write_attributes(out);
        out.extend_from_slice(b", ");
        write_key(out, "relationships");
        let relationships = Node::obj([(
            "file",
            Node::obj([
                (
                    "links",
                    Node::obj([
                        ("self", Node::str(format!("{self_link}/relationships/file"))),
                        ("related", Node::str(format!("{self_link}/file"))),
                    ]),
                ),
                ("meta", Node::obj([("count", Node::int(1))])),
                (
                    "data",
                    Node::obj([("type", Node::str("file")), ("id", Node::str(&self.sha256))]),
                ),
            ]),
        )]);
        write_plain(out, &relationships);
        out.extend_from_slice(b", ");
        write_key(out, "context_attributes");
        let mut context = vec![
            ("file_sha1".to_string(), Node::str(&self.sha1)),
            ("file_md5".to_string(), Node::str(&self.md5)),
            ("file_type_tag".to_string(), Node::str(self.file_type_tag)),
        ];
        for (present, artifact) in self
            .artifacts
            .iter()
            .zip(["html", "pcap", "evtx", "memdump"])
        {
            if *present {
                let key = if artifact == "html" {
                    "html_report"
                } else {
                    artifact
                };
                let url = format!("{API}/feeds/file-behaviours/{}/{artifact}", self.token);
                context.push((key.to_string(), Node::str(url)));
            }
        }
        write_plain(out, &Node::Obj(context));
        out.push(b'}');
    }

    fn write_attributes(&self, out: &mut Vec<u8>) {
        let template = &templates()[self.template as usize];
        let mut rng = SimRng::new(self.salt);
        let flags = ["has_html_report", "has_pcap", "has_evtx", "has_memdump"];
        out.push(b'{');
        for (i, (key, value)) in template.attributes.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            write_key(out, key);
            match key.as_str() {
                "sandbox_name" => write_str(out, self.sandbox),
                "analysis_date" => out.extend_from_slice(self.analysis_date.to_string().as_bytes()),
                "last_modification_date" => {
                    out.extend_from_slice(self.last_modification_date.to_string().as_bytes())
                }
                k if flags.contains(&k) => {
                    let on = flags
                        .iter()
                        .zip(self.artifacts)
                        .any(|(f, on)| *f == k && on);
                    out.extend_from_slice(if on { b"true" } else { b"false" });
                }
                _ => match value {
                    // Short lists (verdicts, tags) are meaningful as a whole; scale the big ones.
                    Node::Arr(items) if items.len() >= 4 => self.write_scaled(out, items, &mut rng),
                    _ => write_node(out, value, &mut |k, s, buf| mutate(k, s, self.salt, buf)),
                },
            }
        }
        out.push(b'}');
    }

    /// Writes each item `floor(scale)` times plus once more with probability
    /// `fract(scale)`; every copy gets its own replacements. Keeps at least one item.
    fn write_scaled(&self, out: &mut Vec<u8>, items: &[Node], rng: &mut SimRng) {
        let keep_one = rng.below(items.len());
        let mut first = true;
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            let mut copies = self.scale.floor() as u64 + u64::from(rng.chance(self.scale.fract()));
            if copies == 0 && i == keep_one && first {
                copies = 1;
            }
            for copy in 0..copies {
                if !first {
                    out.extend_from_slice(b", ");
                }
                first = false;
                let salt = if copy == 0 {
                    self.salt
                } else {
                    mix(self.salt, &[copy, i as u64])
                };
                write_node(out, item, &mut |k, s, buf| mutate(k, s, salt, buf));
            }
        }
        out.push(b']');
    }
}

/// Rewrites the variable parts of a template string: hex runs of 16+
/// characters become fresh hex of the same length and case; digit runs of
/// 3+ keep their first digit and get fresh others. `id` values (MITRE
/// technique, signature and rule ids) are kept.
pub fn mutate(key: Option<&str>, s: &str, salt: u64, out: &mut String) {
    if key == Some("id") {
        out.push_str(s);
        return;
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let hex = bytes[i].is_ascii_hexdigit();
        while i < bytes.len() && bytes[i].is_ascii_hexdigit() == hex {
            i += 1;
        }
        // Runs end at ASCII bytes or the end, so both ends are char boundaries.
        let run = &s[start..i];
        match (hex, run.len()) {
            (true, 16..) => fresh(run, salt, b"0123456789abcdef", 0, out),
            (true, _) => mutate_digits(run, salt, out),
            (false, _) => out.push_str(run),
        }
    }
}

fn mutate_digits(run: &str, salt: u64, out: &mut String) {
    let bytes = run.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let digit = bytes[i].is_ascii_digit();
        while i < bytes.len() && bytes[i].is_ascii_digit() == digit {
            i += 1;
        }
        let sub = &run[start..i];
        if digit && sub.len() >= 3 {
            out.push_str(&sub[..1]);
            fresh(sub, salt, b"0123456789", 1, out);
        } else {
            out.push_str(sub);
        }
    }
}

/// Writes `original.len() - skip` characters from `alphabet`, keyed by (salt, original).
fn fresh(original: &str, salt: u64, alphabet: &[u8], skip: usize, out: &mut String) {
    let upper = original.bytes().any(|b| b.is_ascii_uppercase())
        && !original.bytes().any(|b| b.is_ascii_lowercase());
    let mut rng = SimRng::derive(salt, &[hash_bytes(original.as_bytes())]);
    for _ in skip..original.len() {
        let c = char::from(alphabet[rng.below(alphabet.len())]);
        out.push(if upper { c.to_ascii_uppercase() } else { c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_templates_parse() {
        assert_eq!(templates().len(), 5);
        assert!(templates().iter().all(|t| !t.attributes.is_empty()));
    }

    #[test]
    fn mutation_keeps_shape_and_is_consistent_inside_a_record() {
        let s =
            r"C:\Temp\00000008.00000002.3959222320.0000025948480000.sdmp pid 7388 and 7388, T1055";
        let mut a = String::new();
        mutate(None, s, 1, &mut a);
        let mut b = String::new();
        mutate(None, s, 2, &mut b);
        assert_eq!(a.len(), s.len());
        assert_ne!(a, b);
        assert!(a.starts_with(r"C:\Temp\0") && a.contains(", T1") && a.contains(".sdmp pid 7"));
        let pids: Vec<&str> = a
            .split(' ')
            .filter(|w| w.len() >= 4 && w.starts_with('7'))
            .collect();
        assert_eq!(
            pids[0].trim_end_matches(','),
            pids[1].trim_end_matches(','),
            "{a}"
        );
        let mut kept = String::new();
        mutate(Some("id"), "T1055", 1, &mut kept);
        assert_eq!(kept, "T1055");
    }

    #[test]
    fn records_are_valid_json_with_a_consistent_identity() {
        for index in 0..40 {
            let plan = RecordPlan::new(7, 29_000_000, index);
            let mut out = Vec::new();
            plan.write(&mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let id = v["id"].as_str().unwrap();
            assert_eq!(id, format!("{}_{}", plan.sha256, plan.sandbox));
            assert_eq!(
                v["relationships"]["file"]["data"]["id"],
                plan.sha256.as_str()
            );
            assert_eq!(v["attributes"]["sandbox_name"], plan.sandbox);
            let date = v["attributes"]["analysis_date"].as_i64().unwrap();
            assert_eq!(date.div_euclid(60), 29_000_000);
            assert!(out.is_ascii());
            let has_pcap = v["attributes"]["has_pcap"].as_bool().unwrap();
            assert_eq!(v["context_attributes"].get("pcap").is_some(), has_pcap);
        }
    }

    #[test]
    fn broken_id_styles() {
        let id = |style| {
            RecordPlan::new(7, 29_000_000, 0)
                .with_sandbox("Rising MOVES")
                .with_id_style(style)
                .id()
        };
        let sha = RecordPlan::new(7, 29_000_000, 0).sha256;
        assert_eq!(id(IdStyle::Valid), format!("{sha}_Rising MOVES"));
        assert_eq!(
            id(IdStyle::UppercaseHex),
            format!("{}_Rising MOVES", sha.to_uppercase())
        );
        assert_eq!(
            id(IdStyle::ShortHex),
            format!("{}_Rising MOVES", &sha[..40])
        );
        assert_eq!(id(IdStyle::NoUnderscore), format!("{sha}RisingMOVES"));
        let mut out = Vec::new();
        RecordPlan::new(7, 29_000_000, 0)
            .with_id_style(IdStyle::Missing)
            .write(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("id").is_none());
    }
}
