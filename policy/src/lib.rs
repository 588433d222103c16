//! sluice's policy model: Istio `ServiceEntry` and sluice `EgressPolicy`
//! documents in, verdicts out.
//!
//! Pure: no sockets, no runtime, no clock read here. Time comes in as a
//! [`Timestamp`] from the caller, so everything is testable in microseconds.
//!
//! The layers, in order: [`load`] (files → documents, with `file:line:col`
//! errors) → [`validate`](crate::model) (Istio's rules) → [`Snapshot`] (the
//! compiled matcher the hot path reads) → [`decide`].
#![forbid(unsafe_code)]

mod decide;
mod diag;
pub mod host;
pub mod load;
pub mod model;
mod raw;
mod validate;

pub use diag::{Diagnostic, LoadErrors, Severity};
pub use host::{HostError, HostPattern, Hostname};
pub use load::{SourceFile, load_paths, load_sources, read_paths};
pub use model::PolicySet;
pub mod names;
mod snapshot;
mod time;

pub use decide::{Cluster, Connection, Reason, SniffSource, Sniffed, Verdict, decide};
pub use names::{NameTable, Retention};
pub use snapshot::{HostRef, Snapshot};
pub use time::Timestamp;
