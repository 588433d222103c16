//! The benchmark's network namespace, its nftables rule, and cleanup that
//! also runs on Ctrl-C: whatever this process creates outside itself (the
//! namespace, an HAProxy process, a scratch directory) is registered here and
//! removed by its guard's `Drop`, or by the signal thread before exiting.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};

/// The sink's address: a local address inside the namespace (RFC 2544 benchmark range).
pub(crate) const SINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
/// Bulk sink: reads and discards.
pub(crate) const PORT_BULK: u16 = 5001;
/// Echo sinks (several, so short connections spread over more 4-tuples).
pub(crate) const PORT_ECHO: u16 = 5002;
pub(crate) const ECHO_PORTS: u16 = 8;
/// Hold sink: accepts and waits for EOF (idle connections).
pub(crate) const PORT_HOLD: u16 = 5010;
/// `SO_MARK` the forwarder puts on its upstream sockets; the redirect skips it.
pub(crate) const MARK: u32 = 0x51ce;
/// HAProxy drops to this uid; the redirect skips its sockets by owner.
pub(crate) const HAPROXY_UID: u32 = 65534;

pub(crate) fn sink_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SINK_IP), port)
}

#[derive(Debug, Clone)]
enum Cleanup {
    Netns(String),
    Kill(i32),
    Dir(PathBuf),
}

static CLEANUP: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

fn register(c: Cleanup) -> u64 {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).push((id, c));
    id
}

fn unregister(id: u64) {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != id);
}

fn run_cleanup(c: &Cleanup) {
    match c {
        Cleanup::Kill(pid) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
        }
        Cleanup::Netns(name) => {
            let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        }
        Cleanup::Dir(p) => {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and so in every thread
/// spawned after) and starts a thread that, on one of them, removes what
/// is registered and exits. Call first thing in `main`.
pub(crate) fn install_signal_cleanup() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    std::thread::Builder::new().name("perf-signal".into()).spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\nsluice-perf: {sig}, cleaning up");
            // Processes first (they may hold the namespace), directories, then the namespace.
            let mut items: Vec<Cleanup> =
                CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, c)| c.clone()).collect();
            items.sort_by_key(|c| match c {
                Cleanup::Kill(_) => 0,
                Cleanup::Dir(_) => 1,
                Cleanup::Netns(_) => 2,
            });
            items.iter().for_each(run_cleanup);
            std::process::exit(130);
        }
    })?;
    Ok(())
}

/// Open files this process wants: 10,000 idle connections through the
/// in-process forwarder take three descriptors each (client, the
/// forwarder's two), and the sink's ends are in the parent.
const NOFILE_WANTED: u64 = 1 << 17;

/// Raises the open-files limit (soft and hard: root may raise the hard one
/// up to `fs.nr_open`) to [`NOFILE_WANTED`], or at least the soft one to the hard one.
pub(crate) fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    let want = NOFILE_WANTED.min(nr_open.unwrap_or(hard)).max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The soft open-files limit in force.
pub(crate) fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// A scratch directory removed on drop (and on Ctrl-C).
#[derive(Debug)]
pub(crate) struct ScratchDir {
    pub(crate) path: PathBuf,
    id: u64,
}

impl ScratchDir {
    pub(crate) fn new() -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("sluice-perf-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let id = register(Cleanup::Dir(path.clone()));
        Ok(ScratchDir { path, id })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        run_cleanup(&Cleanup::Dir(self.path.clone()));
        unregister(self.id);
    }
}

/// A child process killed on drop (and on Ctrl-C).
#[derive(Debug)]
pub(crate) struct ChildGuard {
    pub(crate) child: std::process::Child,
    id: u64,
    /// The child leads its own process group (started with `process_group(0)`): kill the whole group.
    group: bool,
}

impl ChildGuard {
    pub(crate) fn new(child: std::process::Child) -> ChildGuard {
        let id = register(Cleanup::Kill(child.id() as i32));
        ChildGuard { child, id, group: false }
    }

    /// A child that leads its own process group, killed with the processes it
    /// forked (nginx's workers would outlive a killed master).
    pub(crate) fn new_group(child: std::process::Child) -> ChildGuard {
        let id = register(Cleanup::Kill(-(child.id() as i32)));
        ChildGuard { child, id, group: true }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.group {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unregister(self.id);
    }
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace that exists for the life of the value.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
    /// Registered for cleanup (0: attached to another process's namespace, left alone).
    id: u64,
}

impl Netns {
    /// Creates the namespace with `lo` up and the sink address on it.
    pub(crate) fn new() -> Result<Netns> {
        let name = format!("sluice-perf-{}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let id = register(Cleanup::Netns(name.clone()));
        let ns = Netns { name, id };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("{SINK_IP}/32"), "dev", "lo"])?;
        // Short connections leave TIME_WAIT behind: a wide port range and reuse.
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000", "net.ipv4.tcp_tw_reuse=1"])?;
        // Connection tracking stays on for the namespace's whole life, for
        // every target (direct too): switched off and on with the redirect
        // table, it would miss closes and keep entries ESTABLISHED whose old
        // NAT binding a later connection with the same ports would follow.
        ns.nft(
            "table ip sluice_perf_ct {
  chain out {
    type filter hook output priority 0; policy accept;
    ct state new counter
  }
}
",
        )?;
        // Conntrack keeps closed connections in TIME_WAIT for 120 s by
        // default; short-connection runs would fill the table.
        ns.exec(&["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"])?;
        Ok(ns)
    }

    /// The namespace `name`, made by another process (the parent benchmark); not removed on drop.
    pub(crate) fn attach(name: &str) -> Netns {
        Netns { name: name.into(), id: 0 }
    }

    pub(crate) fn exec(&self, argv: &[&str]) -> Result<String> {
        sh(Command::new("ip").args(["netns", "exec", &self.name]).args(argv))
    }

    /// `ip netns exec <ns> argv...`, not waited for.
    pub(crate) fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Sends every TCP connection to the sink ports to `port` on loopback,
    /// except the forwarder's (marked) and HAProxy's (by uid) own upstream
    /// connections. The rule counts what it redirects.
    pub(crate) fn redirect_to(&self, port: u16) -> Result<()> {
        self.redirect(&format!(":{port}"))
    }

    /// Like [`Netns::redirect_to`], but each sink port P goes to P + `offset`
    /// (for a proxy that cannot read the original destination: one listener per sink port).
    pub(crate) fn redirect_offset(&self, offset: u16) -> Result<()> {
        let map: Vec<String> = (PORT_BULK..=PORT_HOLD).map(|p| format!("{p} : {}", p + offset)).collect();
        self.redirect(&format!("tcp dport map {{ {} }}", map.join(", ")))
    }

    fn redirect(&self, to: &str) -> Result<()> {
        let (lo, hi) = (PORT_BULK, PORT_HOLD);
        let rules = format!(
            "table ip sluice_perf {{
  chain out {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} return
    meta skuid {HAPROXY_UID} return
    ip daddr {SINK_IP} tcp dport {lo}-{hi} counter redirect to {to}
  }}
}}
"
        );
        let _ = self.clear_redirect();
        self.nft(&rules)
    }

    fn nft(&self, rules: &str) -> Result<()> {
        let mut child = self.command(&["nft", "-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        child.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    pub(crate) fn clear_redirect(&self) -> Result<()> {
        self.exec(&["nft", "delete", "table", "ip", "sluice_perf"]).map(drop)
    }

    /// Connections the redirect rule has sent to the proxy so far (0 without the rule).
    pub(crate) fn redirected(&self) -> u64 {
        let Ok(out) = self.exec(&["nft", "list", "chain", "ip", "sluice_perf", "out"]) else { return 0 };
        out.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// Runs `f` on a new named thread inside the namespace; threads it spawns stay there.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let path = format!("/var/run/netns/{}", self.name);
        let t = std::thread::Builder::new().name(name.into()).spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })?;
        Ok(t)
    }

    /// Runs `f` inside the namespace and waits for it.
    pub(crate) fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn("perf-ns", f)?.join().map_err(|_| anyhow::anyhow!("thread in the namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        run_cleanup(&Cleanup::Netns(self.name.clone()));
        unregister(self.id);
    }
}
