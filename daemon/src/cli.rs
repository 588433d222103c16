//! The command line (bpaf). Each subcommand's arguments are a plain struct
//! handed to the module that runs it.

use std::net::IpAddr;
use std::path::PathBuf;

use bpaf::{OptionParser, Parser, construct, long, positional};

#[derive(Debug, Clone)]
pub(crate) enum Command {
    Check(CheckArgs),
}

#[derive(Debug, Clone)]
pub(crate) struct CheckArgs {
    pub(crate) explain: Option<String>,
    pub(crate) sni: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) resolved_as: Vec<String>,
    pub(crate) source: Option<IpAddr>,
    pub(crate) paths: Vec<PathBuf>,
}

fn check() -> OptionParser<Command> {
    let explain = long("explain")
        .help("Print the verdict for a connection to DEST:PORT (an IP address and port) and why")
        .argument::<String>("DEST:PORT")
        .optional();
    let sni = long("sni").help("With --explain: the TLS SNI the client sends").argument::<String>("NAME").optional();
    let host = long("host")
        .help("With --explain: the HTTP Host header the client sends")
        .argument::<String>("NAME")
        .optional();
    let resolved_as = long("resolved-as")
        .help("With --explain: a name DNS gave for DEST (repeat for several)")
        .argument::<String>("NAME")
        .many();
    let source = long("source")
        .help("With --explain: the client's address (picks the source_workload)")
        .argument::<IpAddr>("IP")
        .optional();
    let paths = positional::<PathBuf>("PATH")
        .help("Policy file or directory (*.yaml, *.yml, *.json)")
        .some("give at least one policy file or directory");
    construct!(CheckArgs { explain, sni, host, resolved_as, source, paths })
        .map(Command::Check)
        .to_options()
        .descr("Validate policy files and print a summary, or explain the verdict for one connection")
        .footer(
            "Examples:\n  sluice check /etc/sluice/policy.d\n  sluice check policy.d --explain 198.18.9.1:443 --sni api.stripe.example\n  sluice check policy.d --explain 198.18.30.1:9300 --resolved-as search.vendor.example\n\nExit status: 0 valid, 1 invalid policy, 64 bad usage.",
        )
}

pub(crate) fn parser() -> OptionParser<Command> {
    let check = check().command("check");
    construct!([check])
        .to_options()
        .version(env!("CARGO_PKG_VERSION"))
        .descr("sluice: a DNS-aware egress daemon for Linux nodes")
}

pub(crate) fn parse() -> Result<Command, bpaf::ParseFailure> {
    parser().run_inner(bpaf::Args::current_args())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parser_invariants_hold() {
        super::parser().check_invariants(false);
    }
}
