//! What the servers say: Prometheus counters before and after, CPU and memory by PID.

use std::collections::BTreeMap;

/// Server-side observation points.
#[derive(clap::Args, Debug, Clone)]
pub struct Observe {
    /// Admin URL of a gateway or persister (`http://127.0.0.1:9100`); repeat for several.
    /// Its counters are read before and after the run.
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// PID of a server process whose CPU time and memory are reported; repeat for several.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
}

/// Sums of every metric sample by name (labels summed), over all the admin URLs.
pub async fn scrape(urls: &[String]) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for url in urls {
        let Ok(resp) = reqwest::get(format!("{}/metrics", url.trim_end_matches('/'))).await else {
            continue;
        };
        let Ok(text) = resp.text().await else {
            continue;
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let Ok(v) = value.parse::<f64>() {
                *sums.entry(name.to_owned()).or_insert(0.0) += v;
            }
        }
    }
    sums
}

/// Counter increases between two scrapes (the `_total` counters, and the `_sum` and
/// `_count` of histograms).
pub fn diff(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.ends_with("_total") || k.ends_with("_sum") || k.ends_with("_count"))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// Where the time went on the servers during a run: the mean of every `*_seconds`
/// histogram (in milliseconds) and of the persister's batch size, from counter diffs.
pub fn breakdown(diff: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    diff.iter()
        .filter_map(|(k, sum)| {
            let base = k.strip_suffix("_sum")?;
            let count = diff.get(&format!("{base}_count")).copied()?;
            (count > 0.0).then_some((base, sum / count))
        })
        .map(|(base, mean)| match base.strip_suffix("_seconds") {
            Some(name) => (format!("{name}_mean_ms"), mean * 1000.0),
            None => (format!("{base}_mean"), mean),
        })
        .collect()
}

/// CPU seconds (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    let cpu_seconds = ticks / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(ProcStat {
        cpu_seconds,
        rss_bytes: rss_kb * 1024,
    })
}

pub fn procs(pids: &[u32]) -> Vec<(u32, ProcStat)> {
    pids.iter()
        .filter_map(|p| proc_stat(*p).map(|s| (*p, s)))
        .collect()
}
