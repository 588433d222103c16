//! The idle scenario for in-process targets (direct, sluice-*) runs in a
//! fresh process: this binary, re-executed with a hidden first argument,
//! attached to the parent's namespace (the parent's sink holds the far ends).
//! A fresh heap makes RSS growth mean what it says; in the parent, memory
//! freed by earlier runs would be reused and hide the cost. HAProxy is its
//! own process already, so the parent measures it directly.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ns::{self, ChildGuard, Netns};
use crate::scenario::{self, Idle, Params};
use crate::target::{Target, Up};

pub(crate) const FLAG: &str = "--idle-child";

/// Parent side: runs the child for `t` and reads its measurement.
pub(crate) fn run(netns: &Netns, t: Target, round: usize, p: &Params) -> Result<Idle> {
    let args = [
        FLAG.to_owned(),
        t.name().to_owned(),
        netns.name.clone(),
        round.to_string(),
        p.workers.to_string(),
        p.pipe_size.to_string(),
        p.idle_conns.to_string(),
        p.hold.as_secs_f64().to_string(),
    ];
    let exe = std::env::current_exe()?;
    let child = Command::new(exe).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut guard = ChildGuard::new(child);
    let until = Instant::now() + p.hold + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = guard.child.try_wait()? {
            break st;
        }
        if Instant::now() > until {
            bail!("the idle measurement process for {} did not finish in time", t.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    guard.child.stdout.take().context("child stdout")?.read_to_string(&mut out)?;
    guard.child.stderr.take().context("child stderr")?.read_to_string(&mut err)?;
    if !status.success() {
        bail!("idle measurement for {} failed: {}", t.name(), err.trim());
    }
    serde_json::from_str(out.trim()).with_context(|| format!("reading the idle measurement {out:?}"))
}

/// Child side: `args` are what [`run`] passes after the flag.
pub(crate) fn main(args: &[String]) -> Result<()> {
    let [target, netns, round, workers, pipe_size, conns, hold] = args else {
        bail!("{FLAG}: wrong arguments {args:?}")
    };
    let t = Target::parse(target).context("target")?;
    ns::raise_nofile();
    let netns = Netns::attach(netns);
    let p = Params {
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        clients: 0,
        idle_conns: conns.parse()?,
        hold: Duration::from_secs_f64(hold.parse()?),
        workers: workers.parse()?,
        pipe_size: pipe_size.parse()?,
    };
    let up = Up::start(&netns, t, &p, None)?;
    let idle = scenario::idle(&netns, &up, round.parse()?, &p)?;
    drop(up);
    println!("{}", serde_json::to_string(&idle)?);
    Ok(())
}
