//! For the idle scenario the in-process forwarder runs in a process of its
//! own: this binary, re-executed with a hidden first argument, attached to
//! the parent's namespace, with the redirect to it installed. The parent
//! opens and holds the connections and reads the child's memory,
//! descriptors and threads from `/proc/<pid>` — like HAProxy's and nginx's.
//! A fresh process makes RSS growth mean what it says (in the parent, heap
//! freed by earlier runs would be reused and hide the cost), and it keeps the
//! proxy's descriptors apart from the generator's: each process needs two
//! per connection, which is what fits under a 20,000 `RLIMIT_NOFILE`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ns::{self, ChildGuard, Netns};
use crate::scenario::Params;
use crate::target::{Target, Up};

pub(crate) const FLAG: &str = "--proxy-child";
/// What the child prints once its forwarder is up and the redirect is in place.
const READY: &str = "ready";

/// A forwarder running in a child process; stopped on drop.
#[derive(Debug)]
pub(crate) struct ProxyChild {
    guard: ChildGuard,
}

impl ProxyChild {
    /// Starts `t` (a sluice target) in a child process and waits until it is ready.
    pub(crate) fn start(netns: &Netns, t: Target, p: &Params) -> Result<ProxyChild> {
        let args = [
            FLAG.to_owned(),
            t.name().to_owned(),
            netns.name.clone(),
            p.workers.to_string(),
            p.pipe_size.to_string(),
            p.pipe_max_size.to_string(),
        ];
        let exe = std::env::current_exe()?;
        let cmd =
            Command::new(exe).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let mut guard = ChildGuard::new(cmd.context("starting the proxy process")?);
        let stdout = guard.child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(line)) if line.trim() == READY => Ok(ProxyChild { guard }),
            _ => {
                let _ = guard.child.kill();
                let mut err = String::new();
                if let Some(mut e) = guard.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("the {} proxy process did not start: {}", t.name(), err.trim())
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

impl Drop for ProxyChild {
    /// Closes the child's stdin (it stops its forwarder and removes the
    /// redirect) and gives it 5 s before the guard kills it.
    fn drop(&mut self) {
        drop(self.guard.child.stdin.take());
        let until = Instant::now() + Duration::from_secs(5);
        while matches!(self.guard.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Child side: `args` are what [`ProxyChild::start`] passes after the flag.
/// Runs the forwarder until stdin closes (the parent is done, or gone).
pub(crate) fn main(args: &[String]) -> Result<()> {
    let [target, netns, workers, pipe_size, pipe_max_size] = args else { bail!("{FLAG}: wrong arguments {args:?}") };
    let t = Target::parse(target).filter(|t| t.is_sluice()).context("target")?;
    ns::raise_nofile();
    let netns = Netns::attach(netns);
    let p = Params {
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        clients: 0,
        idle_conns: 0,
        hold: Duration::ZERO,
        workers: workers.parse()?,
        pipe_size: pipe_size.parse()?,
        pipe_max_size: pipe_max_size.parse()?,
    };
    let up = Up::start(&netns, t, &p, None)?;
    println!("{READY}");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(up);
    Ok(())
}
