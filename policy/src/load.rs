//! Reading policy files: paths → documents → validated [`PolicySet`].
//!
//! Each YAML document is parsed on its own (see [`split_documents`]), so one
//! broken document does not hide the problems of the others, and every
//! problem in every file is reported in one run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

use crate::diag::{DocPlace, LoadErrors, file_problem, path_arc};
use crate::model::{EgressSettings, IgnoredDoc, Mode, Origin, PolicySet};
use crate::raw::{self, Envelope};
use crate::validate::{self, Checker};
use crate::{Diagnostic, Severity};

/// Files larger than this are refused: a policy file is hand-written.
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// A directory with more policy files than this is refused.
pub const MAX_FILES: usize = 10_000;
const MAX_DEPTH: usize = 8;

/// One policy file's contents.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: Arc<Path>,
    pub bytes: Vec<u8>,
}

/// Reads every path: a file as is, a directory's `*.yaml`, `*.yml` and
/// `*.json` files (recursively, sorted, skipping names that start with `.`,
/// such as Kubernetes ConfigMap `..data` folders, whose files are reached
/// through the top-level symlinks). A file or directory reached twice (a
/// symlink to it, or to a directory above it) is read once.
pub fn read_paths<P: AsRef<Path>>(paths: &[P]) -> (Vec<SourceFile>, Vec<Diagnostic>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut seen = Seen::new();
    for path in paths {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(meta) if !first_visit(&mut seen, &meta) => {}
            Ok(meta) if meta.is_dir() => walk_dir(path, 0, &mut seen, &mut files, &mut problems),
            Ok(_) => read_one(path, &mut files, &mut problems),
            Err(e) => problems.push(file_problem(&path_arc(path), 0, 0, format!("cannot read: {e}"))),
        }
    }
    if files.len() > MAX_FILES {
        let first = files[0].path.clone();
        problems.push(file_problem(
            &first,
            0,
            0,
            format!("{} policy files found, at most {MAX_FILES} are read", files.len()),
        ));
        files.truncate(MAX_FILES);
    }
    (files, problems)
}

/// The files and directories read so far, by device and inode.
type Seen = std::collections::HashSet<(u64, u64)>;

fn first_visit(seen: &mut Seen, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    seen.insert((meta.dev(), meta.ino()))
}

fn walk_dir(dir: &Path, depth: usize, seen: &mut Seen, files: &mut Vec<SourceFile>, problems: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect::<Vec<PathBuf>>(),
        Err(e) => {
            return problems.push(file_problem(&path_arc(dir), 0, 0, format!("cannot read directory: {e}")));
        }
    };
    let mut entries = entries;
    entries.sort();
    for path in entries {
        let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
        if hidden || files.len() > MAX_FILES {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() && depth < MAX_DEPTH && first_visit(seen, &m) => {
                walk_dir(&path, depth + 1, seen, files, problems);
            }
            Ok(m) if m.is_file() && is_policy_file(&path) && first_visit(seen, &m) => read_one(&path, files, problems),
            Ok(_) => {}
            // A dangling symlink in the middle of a ConfigMap swap: skip it, the next read sees the new one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(file_problem(&path_arc(&path), 0, 0, format!("cannot read: {e}"))),
        }
    }
}

fn is_policy_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

fn read_one(path: &Path, files: &mut Vec<SourceFile>, problems: &mut Vec<Diagnostic>) {
    use std::io::Read;
    let arc = path_arc(path);
    let mut bytes = Vec::new();
    let res = std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes));
    match res {
        Err(e) => problems.push(file_problem(&arc, 0, 0, format!("cannot read: {e}"))),
        Ok(_) if bytes.len() > MAX_FILE_BYTES => {
            problems.push(file_problem(&arc, 0, 0, format!("file is larger than {} MiB", MAX_FILE_BYTES >> 20)))
        }
        Ok(_) => files.push(SourceFile { path: arc, bytes }),
    }
}

/// Reads and validates paths in one step.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Result<PolicySet, LoadErrors> {
    let (files, mut problems) = read_paths(paths);
    match load_sources(&files) {
        Ok(set) if problems.is_empty() => Ok(set),
        Ok(_) => Err(LoadErrors(problems)),
        Err(LoadErrors(more)) => {
            problems.extend(more);
            Err(LoadErrors(problems))
        }
    }
}

/// A document's text and the number of file lines before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocChunk<'a> {
    pub line_offset: u64,
    pub text: &'a str,
}

/// Splits a YAML stream into its documents without parsing it.
///
/// YAML forbids a line that starts with `---` or `...` (followed by a blank
/// or the end of the line) inside any scalar, so such lines are always
/// document markers. A chunk that holds only comments, blank lines or
/// directives is kept with the document after it.
pub fn split_documents(text: &str) -> Vec<DocChunk<'_>> {
    let mut out = Vec::new();
    let (mut start, mut start_line, mut has_content) = (0usize, 0u64, false);
    // Whether the chunk has a `---` already: a second one with nothing between
    // them ends an empty document, which is dropped (the parser would read it
    // as a null, not a mapping).
    let mut has_marker = false;
    let mut offset = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let line_no = line_no as u64;
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            if has_content {
                out.push(DocChunk { line_offset: start_line, text: &text[start..offset] });
            }
            if has_content || has_marker {
                (start, start_line, has_content) = (offset, line_no, false);
            }
            has_marker = true;
        }
        offset += line.len();
        if is_marker(bare, "...") {
            if has_content {
                out.push(DocChunk { line_offset: start_line, text: &text[start..offset] });
            }
            (start, start_line, has_content, has_marker) = (offset, line_no + 1, false, false);
            continue;
        }
        let t = bare.trim_start();
        // `---` alone, or with a comment after it (`--- # payments`).
        let marker_only = is_marker(bare, "---") && bare[3..].split('#').next().is_some_and(|r| r.trim().is_empty());
        if !(t.is_empty() || t.starts_with('#') || bare.starts_with('%') || marker_only) {
            has_content = true;
        }
    }
    if has_content {
        out.push(DocChunk { line_offset: start_line, text: &text[start..] });
    }
    out
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_events: 1_000_000,
            max_depth: 64,
            max_nodes: 250_000,
        },
    }
}

/// Parses one document as `T`; a failure becomes a diagnostic at its place.
fn parse_doc<T: DeserializeOwned>(text: &str, place: &DocPlace) -> Result<T, Diagnostic> {
    serde_saphyr::from_str_with_options::<T>(text, yaml_options()).map_err(|e| {
        let loc = e.location().unwrap_or(serde_saphyr::Location::UNKNOWN);
        let msg = yaml_error_message(&e);
        place.at(loc, msg, "")
    })
}

/// serde-saphyr's user-facing message, without location (our prefix says where).
fn yaml_error_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    let text = serde_saphyr::UserMessageFormatter.format_message(e);
    let first = text.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.split(", set DuplicateKeyPolicy").next().unwrap_or(first);
    // The deserializer speaks of events; a person writing YAML thinks in lists and mappings.
    first.replace("sequence start", "a list here").replace("mapping start", "a mapping here")
}

const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// Validates every document of every file. Returns the policy set, or all
/// the errors found (warnings travel with the set).
pub fn load_sources(files: &[SourceFile]) -> Result<PolicySet, LoadErrors> {
    let mut acc = Acc::default();
    for file in files {
        let text = match std::str::from_utf8(&file.bytes) {
            Ok(t) => t,
            Err(e) => {
                let (line, col) = line_col(&file.bytes, e.valid_up_to());
                acc.problems.push(file_problem(&file.path, line, col, "not UTF-8 text: a policy file must be YAML"));
                continue;
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for chunk in split_documents(text) {
            load_document(&mut acc, &file.path, chunk);
        }
    }
    acc.finish(files)
}

fn line_col(bytes: &[u8], at: usize) -> (u64, u64) {
    let before = &bytes[..at.min(bytes.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let col = before.iter().rev().take_while(|b| **b != b'\n').count() as u64 + 1;
    (line, col)
}

#[derive(Default)]
struct Acc {
    problems: Vec<Diagnostic>,
    entries: Vec<crate::model::ServiceEntry>,
    egress: Vec<EgressSettings>,
    sidecar_modes: Vec<(Mode, Origin)>,
    ignored: Vec<IgnoredDoc>,
}

fn load_document(acc: &mut Acc, file: &Arc<Path>, chunk: DocChunk<'_>) {
    let first_line = chunk.text.lines().position(|l| {
        let t = l.trim();
        !(t.is_empty() || t.starts_with('#') || t.starts_with('%') || t == "---")
    });
    let start_line = chunk.line_offset + first_line.unwrap_or(0) as u64 + 1;
    let place = DocPlace { file: file.clone(), line_offset: chunk.line_offset, start: (start_line, 1) };
    let origin = Origin { file: file.clone(), line: start_line };
    let env: Envelope = match parse_doc(chunk.text, &place) {
        Ok(env) => env,
        Err(d) => return acc.problems.push(d),
    };
    let (Some(api), Some(kind)) = (&env.api_version, &env.kind) else {
        let loc = serde_saphyr::Location::UNKNOWN;
        let msg = "not a Kubernetes resource: apiVersion and kind are required";
        return acc.problems.push(place.at(loc, msg, ""));
    };
    let (group, version) = api.value.split_once('/').unwrap_or(("", api.value.as_str()));
    let mut ck = Checker { place: &place, problems: Vec::new() };
    match (group, kind.value.as_str()) {
        ("networking.istio.io", "ServiceEntry" | "Sidecar") if !ISTIO_VERSIONS.contains(&version) => {
            let msg = format!(
                "unsupported apiVersion {:?} for {} (one of networking.istio.io/v1, v1beta1, v1alpha3)",
                api.value, kind.value
            );
            ck.problems.push(place.at(api.referenced, msg, "apiVersion"));
        }
        ("networking.istio.io", "ServiceEntry") => {
            if let Some(spec) =
                typed_spec::<raw::IstioDoc<raw::ServiceEntrySpec>, _>(acc, &place, chunk.text, |d| d.spec)
            {
                let name = env.metadata.name.clone().unwrap_or_default();
                let se = validate::service_entry(&mut ck, name, env.metadata.namespace.clone(), origin, spec);
                acc.entries.extend(se);
            }
        }
        ("networking.istio.io", "Sidecar") => {
            if let Some(spec) = typed_spec::<raw::IstioDoc<raw::SidecarSpec>, _>(acc, &place, chunk.text, |d| d.spec) {
                let spec = spec.value;
                let mode = spec.outbound_traffic_policy.and_then(|o| o.mode);
                match (mode, spec.workload_selector) {
                    (Some(m), None) => acc.sidecar_modes.push((m.value, origin)),
                    (Some(m), Some(_)) => ck.warn(
                        m.referenced,
                        "a Sidecar with a workloadSelector is ignored: sluice's mode is node-wide",
                        "spec.outboundTrafficPolicy.mode",
                    ),
                    (None, _) => acc.ignored.push(ignored(&env, origin)),
                }
            }
        }
        ("sluice.dev", "EgressPolicy") if version == "v1alpha1" => {
            let doc = parse_doc::<raw::OwnDoc<raw::EgressPolicySpec>>(chunk.text, &place);
            match doc {
                Ok(doc) => {
                    acc.egress.push(validate::egress_policy(&mut ck, env.metadata.name.clone(), origin, doc.spec))
                }
                Err(d) => acc.problems.push(d),
            }
        }
        ("sluice.dev", _) => {
            let msg = format!(
                "unknown sluice kind {:?} in {:?} (sluice.dev/v1alpha1 EgressPolicy is the only one)",
                kind.value, api.value
            );
            ck.problems.push(place.at(kind.referenced, msg, "kind"));
        }
        (_, "ServiceEntry" | "Sidecar" | "EgressPolicy" | "List") => {
            // Read by sluice under another group (a typo), or a `kubectl get -o yaml` list: ignored,
            // but said, as a policy that silently lost its EgressPolicy would fall back to ALLOW_ANY.
            let msg = if kind.value == "List" {
                "a List is ignored: sluice reads one resource per document (split it at ---)".to_owned()
            } else {
                format!(
                    "{} in {:?} is ignored: sluice reads it in {}",
                    kind.value,
                    api.value,
                    if kind.value == "EgressPolicy" { "sluice.dev/v1alpha1" } else { "networking.istio.io" }
                )
            };
            ck.warn(kind.referenced, msg, "kind");
            acc.ignored.push(ignored(&env, origin));
        }
        _ => acc.ignored.push(ignored(&env, origin)),
    }
    acc.problems.extend(ck.problems);
}

fn typed_spec<D: DeserializeOwned, S>(
    acc: &mut Acc,
    place: &DocPlace,
    text: &str,
    spec: impl FnOnce(D) -> Option<Spanned<S>>,
) -> Option<Spanned<S>> {
    match parse_doc::<D>(text, place) {
        Ok(doc) => {
            let s = spec(doc);
            if s.is_none() {
                acc.problems.push(place.at(serde_saphyr::Location::UNKNOWN, "spec is required", "spec"));
            }
            s
        }
        Err(d) => {
            acc.problems.push(d);
            None
        }
    }
}

fn ignored(env: &Envelope, origin: Origin) -> IgnoredDoc {
    IgnoredDoc {
        origin,
        api_version: env.api_version.as_ref().map(|s| s.value.clone()).unwrap_or_default(),
        kind: env.kind.as_ref().map(|s| s.value.clone()).unwrap_or_default(),
        name: env.metadata.name.clone(),
    }
}

impl Acc {
    fn finish(mut self, files: &[SourceFile]) -> Result<PolicySet, LoadErrors> {
        if self.egress.len() > 1 {
            let first = self.egress[0].origin.as_ref().map(|o| o.to_string()).unwrap_or_default();
            for e in &self.egress[1..] {
                if let Some(o) = &e.origin {
                    let msg =
                        format!("a second EgressPolicy in the policy set (the first is at {first}): keep exactly one");
                    self.problems.push(file_problem(&o.file, o.line, 1, msg));
                }
            }
        }
        let mut settings = self.egress.pop().unwrap_or_default();
        self.apply_sidecar_modes(&mut settings);
        self.problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        let (errors, warnings): (Vec<_>, Vec<_>) =
            self.problems.into_iter().partition(|d| d.severity == Severity::Error);
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        Ok(PolicySet {
            entries: self.entries,
            settings,
            ignored: self.ignored,
            files: files.iter().map(|f| f.path.clone()).collect(),
            warnings,
        })
    }

    /// A namespace-wide Istio Sidecar may carry the mode; sluice's own
    /// EgressPolicy wins when it sets one. Then says when `blockUnregistered`
    /// has no effect, the mode being known.
    fn apply_sidecar_modes(&mut self, settings: &mut EgressSettings) {
        self.sidecar_mode(settings);
        let useless = settings.dns.block_unregistered && settings.mode == Mode::AllowAny;
        if let Some(own) = settings.origin.as_ref().filter(|_| useless) {
            let msg = "dns.blockUnregistered has no effect with mode ALLOW_ANY";
            let field = Some("spec.dns.blockUnregistered".to_owned());
            let d = Diagnostic { severity: Severity::Warning, field, ..file_problem(&own.file, own.line, 1, msg) };
            self.problems.push(d);
        }
    }

    fn sidecar_mode(&mut self, settings: &mut EgressSettings) {
        let Some((first_mode, first_origin)) = self.sidecar_modes.first().cloned() else {
            return;
        };
        for (mode, origin) in &self.sidecar_modes[1..] {
            if *mode != first_mode {
                let msg =
                    format!("Sidecars disagree on outboundTrafficPolicy.mode ({first_origin} says {first_mode:?})");
                self.problems.push(file_problem(&origin.file, origin.line, 1, msg));
            }
        }
        match &settings.origin {
            Some(own) if settings.mode_set && settings.mode != first_mode => {
                let msg = format!(
                    "Sidecar mode {first_mode:?} is overridden by the EgressPolicy at {own} ({:?})",
                    settings.mode
                );
                let mut d = file_problem(&first_origin.file, first_origin.line, 1, msg);
                d.severity = Severity::Warning;
                self.problems.push(d);
            }
            Some(_) if settings.mode_set => {}
            _ => settings.mode = first_mode,
        }
    }
}
