//! The command line (bpaf). Each subcommand's arguments are a plain struct
//! handed to the module that runs it.

use std::net::IpAddr;
use std::path::PathBuf;

use bpaf::{OptionParser, Parser, construct, long, positional};

use crate::config::{DriverName, Overrides};

#[derive(Debug, Clone)]
pub(crate) enum Command {
    Check(CheckArgs),
    Run(Overrides),
    Rules(RulesAction, crate::rules::Rules),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RulesAction {
    Print,
    Apply,
    Remove,
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
            "Exit status: 0 valid, 1 invalid policy, 64 bad usage.\n\nExamples:\n  sluice check /etc/sluice/policy.d\n  sluice check policy.d --explain 198.18.9.1:443 --sni api.stripe.example\n  sluice check policy.d --explain 198.18.30.1:9300 --resolved-as search.vendor.example",
        )
}

fn run() -> OptionParser<Command> {
    let config =
        long("config").help("YAML config file (unknown fields are errors)").argument::<PathBuf>("FILE").optional();
    let policy = long("policy")
        .help("Policy file or directory, watched for changes (repeatable; default /etc/sluice/policy.d if it exists)")
        .argument::<PathBuf>("PATH")
        .many();
    let listen = long("listen")
        .help("Forwarder address (repeatable; default 127.0.0.1:15001 and [::1]:15001)")
        .argument::<std::net::SocketAddr>("ADDR")
        .many();
    let dns_listen = long("dns-listen")
        .help("DNS proxy address, UDP and TCP (repeatable; default 127.0.0.1:15053)")
        .argument::<std::net::SocketAddr>("ADDR")
        .many();
    let dns_upstream = long("dns-upstream")
        .help("Upstream DNS server (repeatable; default: the nameservers of /etc/resolv.conf)")
        .argument::<std::net::SocketAddr>("ADDR")
        .many();
    let admin_listen = long("admin-listen")
        .help("Admin API address (default 127.0.0.1:15090)")
        .argument::<std::net::SocketAddr>("ADDR")
        .optional();
    let workers = long("workers").help("Forwarder threads (default: one per core)").argument::<usize>("N").optional();
    let io_driver = long("io-driver")
        .help("auto (io_uring if the kernel allows, else epoll), uring, or epoll")
        .argument::<String>("DRIVER")
        .parse(|s| match s.as_str() {
            "auto" => Ok(DriverName::Auto),
            "uring" | "io_uring" => Ok(DriverName::Uring),
            "epoll" => Ok(DriverName::Epoll),
            _ => Err("expected auto, uring or epoll"),
        })
        .optional();
    let state_dir = long("state-dir")
        .help("Where the name table and the last good policy are kept across restarts")
        .argument::<PathBuf>("DIR")
        .optional();
    let log_json = long("log-json").help("Log JSON lines instead of text").switch();
    let intercept = long("intercept")
        .help("Install the nftables rules (as `sluice rules apply`) at start and remove them at exit; listeners move to 0.0.0.0/[::]")
        .switch();
    construct!(Overrides { config, policy, listen, dns_listen, dns_upstream, admin_listen, workers, io_driver, state_dir, log_json, intercept })
        .map(Command::Run)
        .to_options()
        .descr("Run sluice: the forwarder, the DNS proxy, the admin API and policy hot reload")
        .footer(
            "Signals: SIGHUP re-reads the policy; SIGTERM drains connections and exits 0.\nExit status: 0 after a clean stop, 64 bad usage, configuration or policy, 1 a failure while starting or running.\n\nExamples:\n  sluice run                                   # embedded defaults, ALLOW_ANY\n  sluice run --policy /etc/sluice/policy.d --state-dir /var/lib/sluice\n  sluice run --config /etc/sluice/sluice.yaml --io-driver epoll",
        )
}

fn rules() -> OptionParser<Command> {
    let forwarder_port =
        long("port").help("The forwarder's port (default 15001)").argument::<u16>("PORT").fallback(15001);
    let dns_port = long("dns-port")
        .help("The DNS proxy's port: UDP/TCP 53 is redirected there (default 15053; 0 leaves DNS alone)")
        .argument::<u16>("PORT")
        .fallback(15053)
        .map(|p| (p != 0).then_some(p));
    let mark = long("mark")
        .help("SO_MARK of sluice's upstream sockets, excluded (default 0x51ce; 0 for none)")
        .argument::<String>("MARK")
        .parse(|s| {
            let t = s.trim();
            match t.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => t.parse(),
            }
        })
        .fallback(crate::config::DEFAULT_MARK);
    let uid = long("uid").help("sluice's user id, excluded").argument::<u32>("UID").optional();
    let exclude =
        long("exclude").help("Destination CIDR never intercepted (repeatable)").argument::<ipnet::IpNet>("CIDR").many();
    let exclude_ports =
        long("exclude-port").help("Destination port never intercepted, nor dropped by --drop-udp (repeatable)");
    let exclude_ports = exclude_ports.argument::<u16>("PORT").many();
    let drop_udp = long("drop-udp")
        .help("Drop other new outbound UDP flows (QUIC), for REGISTRY_ONLY nodes; DNS and replies still pass")
        .switch();
    let rules =
        construct!(crate::rules::Rules { forwarder_port, dns_port, mark, uid, exclude, exclude_ports, drop_udp });
    let action = positional::<String>("ACTION").help("print, apply or remove").parse(|a| match a.as_str() {
        "print" => Ok(RulesAction::Print),
        "apply" => Ok(RulesAction::Apply),
        "remove" => Ok(RulesAction::Remove),
        _ => Err("expected print, apply or remove"),
    });
    construct!(rules, action)
        .guard(
            // `remove` takes what `apply` took, and must still remove.
            |(r, action)| matches!(action, RulesAction::Remove) || r.spares_sluice(),
            "--mark 0 needs --uid: nothing else keeps sluice's own connections and lookups out of the rules \
             (they would come straight back to it)",
        )
        .map(|(rules, action)| Command::Rules(action, rules))
        .to_options()
        .descr("The nftables ruleset (table inet sluice) that sends the node's outbound TCP to the forwarder")
        .footer("apply replaces the table atomically; remove succeeds when it is already gone.\nExit status: 0 done, 1 nft failed (its message is printed), 64 bad usage.\n\nExamples:\n  sluice rules print --exclude 10.96.0.0/12 --drop-udp\n  sluice rules apply --uid $(id -u sluice)\n  sluice rules remove")
}

pub(crate) fn parser() -> OptionParser<Command> {
    let check = check().command("check");
    let run = run().command("run");
    let rules = rules().command("rules");
    construct!([run, check, rules])
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
