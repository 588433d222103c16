//! Problems found in policy files, each pointing at `file:line:column`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::Location;

/// Whether a problem stops the policy set from loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in one file: `file:line:column: message (field)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: Arc<Path>,
    /// 1-based; 0 when the problem has no single place (e.g. an unreadable file).
    pub line: u64,
    pub column: u64,
    pub message: String,
    /// The field path inside the document, e.g. `spec.ports[0].number`.
    pub field: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line.max(1), self.column.max(1))?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(field) = &self.field {
            write!(f, " ({field})")?;
        }
        Ok(())
    }
}

/// Where a document sits in its file: diagnostics inside it are shifted by
/// the lines that come before it (each document is parsed on its own).
#[derive(Debug, Clone)]
pub(crate) struct DocPlace {
    pub(crate) file: Arc<Path>,
    /// Lines of the file before this document's first line.
    pub(crate) line_offset: u64,
    /// Location of the document's first line, for problems with no better place.
    pub(crate) start: (u64, u64),
}

impl DocPlace {
    pub(crate) fn at(&self, loc: Location, message: impl Into<String>, field: impl Into<String>) -> Diagnostic {
        let (line, column) = if loc.line() == 0 { self.start } else { (loc.line() + self.line_offset, loc.column()) };
        Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
            field: Some(field.into()).filter(|f: &String| !f.is_empty()),
        }
    }

    pub(crate) fn warn(&self, loc: Location, message: impl Into<String>, field: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..self.at(loc, message, field) }
    }
}

/// All the errors of one load, in file order. `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<Diagnostic>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

pub(crate) fn file_problem(file: &Arc<Path>, line: u64, column: u64, message: impl Into<String>) -> Diagnostic {
    Diagnostic { severity: Severity::Error, file: file.clone(), line, column, message: message.into(), field: None }
}

pub(crate) fn path_arc(path: &Path) -> Arc<Path> {
    Arc::from(PathBuf::from(path).into_boxed_path())
}
