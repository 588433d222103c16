//! CPU time, memory, threads and descriptors, read from `/proc`.
//! Times are in clock ticks (`USER_HZ`, 100 per second on Linux).

use std::fs;

pub(crate) const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime from a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let mut f = s.rsplit_once(')')?.1.split_whitespace();
    // After ')': state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// This process's threads: (tid, name).
pub(crate) fn tasks() -> Vec<(u32, String)> {
    tasks_of("self")
}

/// The threads of `/proc/<pid>` ("self" for this process): (tid, name).
fn tasks_of(pid: &str) -> Vec<(u32, String)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        Some((tid, comm.trim_end().to_owned()))
    })
    .collect()
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
pub(crate) fn task_ticks(prefix: &str) -> u64 {
    tasks()
        .into_iter()
        .filter(|(_, name)| name.starts_with(prefix))
        .filter_map(|(tid, _)| stat_ticks(&format!("/proc/self/task/{tid}/stat")))
        .sum()
}

/// CPU ticks of a whole process (all its threads).
pub(crate) fn pid_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat")).unwrap_or(0)
}

/// Every process on the machine with its parent: (pid, ppid).
fn processes() -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // After ')': state, then ppid.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `pid` and all its descendants (nginx's master and workers; nsd's main,
/// xfrd and server processes, two levels down).
pub(crate) fn tree(pid: u32) -> Vec<u32> {
    let all = processes();
    let mut pids = vec![pid];
    let mut i = 0;
    while let Some(&parent) = pids.get(i) {
        pids.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    pids
}

/// Kernel threads on the machine (kthreadd, pid 2, and its children):
/// the idle scenario reports how many appear while connections are held.
pub(crate) fn kernel_threads() -> usize {
    processes().iter().filter(|(pid, ppid)| *pid == 2 || *ppid == 2).count()
}

/// CPU ticks of `pid` and its child processes.
pub(crate) fn tree_ticks(pid: u32) -> u64 {
    tree(pid).into_iter().map(pid_ticks).sum()
}

/// CPU ticks of this whole process.
pub(crate) fn self_ticks() -> u64 {
    stat_ticks("/proc/self/stat").unwrap_or(0)
}

/// Machine-wide busy ticks (all CPUs, everything but idle and iowait).
pub(crate) fn machine_busy() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else { return 0 };
    let Some(line) = s.lines().next() else { return 0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    v.iter().take(8).sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
}

/// VmRSS of `/proc/<pid>` ("self" for this process), KiB.
pub(crate) fn rss_kib(pid: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open descriptors of `/proc/<pid>` ("self" for this process).
pub(crate) fn fds(pid: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// io_uring's kernel workers (io-wq) in processes `pids`: (all of them,
/// those serving rings of threads whose name starts with `owner_prefix`). A
/// worker is a thread named `iou-wrk-<tid>` after the thread whose ring it serves.
pub(crate) fn iowq_workers(pids: &[u32], owner_prefix: &str) -> (usize, usize) {
    let tasks: Vec<(u32, String)> = pids.iter().flat_map(|p| tasks_of(&p.to_string())).collect();
    let owners: Vec<String> =
        tasks.iter().filter(|(_, n)| n.starts_with(owner_prefix)).map(|(tid, _)| tid.to_string()).collect();
    let workers: Vec<&str> = tasks.iter().filter_map(|(_, n)| n.strip_prefix("iou-wrk-")).collect();
    let owned = workers.iter().filter(|w| owners.iter().any(|o| o == *w)).count();
    (workers.len(), owned)
}

/// CPU ticks of this process's children that have exited and been waited
/// for (dnsperf runs: its CPU is known only once it is gone).
pub(crate) fn waited_children_ticks() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else { return 0 };
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    (us(u.user_time()) + us(u.system_time())) * TICKS_PER_SEC as u64 / 1_000_000
}
