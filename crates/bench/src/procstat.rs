//! Process statistics from `/proc`: CPU seconds, resident memory, and the fd limit.
//!
//! CPU is read from `/proc/<pid>/stat` (utime + stime, fields 14 and 15, in clock ticks) so that
//! the service, the Postgres cluster and the bench itself can each be charged per phase without
//! any cooperation from the measured processes.

use anyhow::{bail, Context, Result};

/// CPU seconds used so far by the measured parties (None = cannot be observed).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub service: Option<f64>,
    pub postgres: Option<f64>,
    pub bench: f64,
}

impl CpuSample {
    /// CPU used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSample) -> CpuSample {
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        CpuSample {
            service: diff(self.service, earlier.service),
            postgres: diff(self.postgres, earlier.postgres),
            bench: self.bench - earlier.bench,
        }
    }
}

/// The numeric fields of `/proc/<pid>/stat` that the bench needs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub ppid: u32,
    /// Process state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    pub utime: u64,
    pub stime: u64,
    /// CPU of children that this process has already waited for (fields 16 and 17).
    pub cutime: u64,
    pub cstime: u64,
}

impl Stat {
    /// Own CPU in seconds.
    pub fn cpu_secs(&self) -> f64 {
        (self.utime + self.stime) as f64 / clock_ticks()
    }

    /// CPU of reaped children in seconds.
    pub fn children_cpu_secs(&self) -> f64 {
        (self.cutime + self.cstime) as f64 / clock_ticks()
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Parse the text of a `/proc/<pid>/stat` file.
pub fn parse_stat(text: &str) -> Result<Stat> {
    // The command name (field 2) is in parentheses and may itself contain spaces or ')', so
    // the remaining fields start after the last ')'.
    let close = text.rfind(')').context("no ')' in stat line")?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let field = |n: usize| -> Result<u64> {
        let raw = rest.get(n - 3).with_context(|| format!("stat field {n} missing"))?;
        raw.parse().with_context(|| format!("stat field {n} = {raw:?}"))
    };
    let state = rest.first().and_then(|s| s.chars().next()).context("stat state missing")?;
    Ok(Stat {
        ppid: u32::try_from(field(4)?).context("ppid out of range")?,
        state,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// `/proc/<pid>/stat`, or `None` when the process is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).ok()
}

/// CPU seconds used so far by one process.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat(pid).map(|s| s.cpu_secs())
}

/// CPU seconds used so far by this bench process (all threads).
pub fn self_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds of a Postgres cluster: the postmaster, its live children, and the children it
/// already reaped. Backends come and go with connections; without the reaped part (cutime/cstime
/// of the postmaster) the CPU of a closed connection would vanish from the sum mid-phase.
pub fn pg_cluster_cpu_secs(postmaster: u32) -> Option<f64> {
    let master = stat(postmaster)?;
    let mut total = master.cpu_secs() + master.children_cpu_secs();
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(child) = stat(pid).filter(|s| s.ppid == postmaster) {
            total += child.cpu_secs();
        }
    }
    Some(total)
}

/// Resident set size (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The largest resident set size the process has had (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raise the soft open-files limit to the hard limit (each held stream needs one socket).
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            bail!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_name() {
        let line = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 100 1000 10";
        let s = parse_stat(line).expect("valid stat");
        assert_eq!(s.ppid, 1);
        assert_eq!(s.state, 'S');
        assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (250, 50, 7, 3));
    }
}
