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

/// Sums of every metric sample by name (labels summed), over all the admin URLs; a
/// histogram's buckets keep their bound (`name_bucket{le="0.005"}`).
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
            let key = match bucket_bound(series) {
                Some(le) if name.ends_with("_bucket") => format!("{name}{{le=\"{le}\"}}"),
                _ => name.to_owned(),
            };
            if let Ok(v) = value.parse::<f64>() {
                *sums.entry(key).or_insert(0.0) += v;
            }
        }
    }
    sums
}

/// The `le` label of a histogram bucket series.
fn bucket_bound(series: &str) -> Option<&str> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    labels
        .split(',')
        .find_map(|label| label.strip_prefix("le=\""))
        .and_then(|le| le.strip_suffix('"'))
}

/// Counter increases between two scrapes (the `_total` counters, and the `_sum`, `_count`
/// and buckets of histograms).
pub fn diff(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| {
            k.ends_with("_total")
                || k.ends_with("_sum")
                || k.ends_with("_count")
                || k.contains("_bucket{")
        })
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// Where the time went on the servers during a run: the mean and the p99 of every
/// `*_seconds` histogram (in milliseconds) and of the persister's batch size, from counter
/// diffs. The p99 is an upper bound: the bound of the first bucket that holds 99% of the
/// observations (`_p99_le_ms`), as exact as the buckets are fine.
pub fn breakdown(diff: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, sum) in diff {
        let Some(base) = k.strip_suffix("_sum") else {
            continue;
        };
        let Some(count) = diff.get(&format!("{base}_count")).copied() else {
            continue;
        };
        if count <= 0.0 {
            continue;
        }
        let (name, scale, unit) = match base.strip_suffix("_seconds") {
            Some(name) => (name, 1000.0, "_ms"),
            None => (base, 1.0, ""),
        };
        out.insert(format!("{name}_mean{unit}"), sum / count * scale);
        if let Some(le) = quantile_bound(diff, base, count, 0.99) {
            out.insert(format!("{name}_p99_le{unit}"), le * scale);
        }
    }
    out
}

/// The smallest bucket bound under which at least `q` of the `count` observations fall.
fn quantile_bound(diff: &BTreeMap<String, f64>, base: &str, count: f64, q: f64) -> Option<f64> {
    let prefix = format!("{base}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = diff
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, n)| {
            let le = bucket_bound(k)?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
        .into_iter()
        .find(|(_, n)| *n >= q * count)
        .map(|(le, _)| le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_first_bucket_holding_99_percent() {
        let mut diff = BTreeMap::new();
        diff.insert("x_seconds_sum".to_owned(), 1.0);
        diff.insert("x_seconds_count".to_owned(), 1000.0);
        for (le, n) in [
            ("0.001", 900.0),
            ("0.0025", 985.0),
            ("0.005", 995.0),
            ("+Inf", 1000.0),
        ] {
            diff.insert(format!("x_seconds_bucket{{le=\"{le}\"}}"), n);
        }
        let out = breakdown(&diff);
        assert_eq!(out["x_mean_ms"], 1.0);
        assert_eq!(out["x_p99_le_ms"], 5.0);
    }

    #[test]
    fn cpu_between_readings_is_per_process_and_in_order() {
        let at = |cpu_seconds| ProcStat {
            cpu_seconds,
            rss_bytes: 0,
        };
        let before = [(7, at(1.0)), (9, at(2.0))];
        let after = [(9, at(2.5)), (7, at(4.0)), (11, at(1.0))];
        assert_eq!(
            cpu_between(&before, &after),
            vec![(9, Some(0.5)), (7, Some(3.0)), (11, None)]
        );
    }

    #[test]
    fn a_bucket_series_keeps_its_bound() {
        assert_eq!(bucket_bound(r#"x_bucket{pod="a",le="0.5"}"#), Some("0.5"));
        assert_eq!(bucket_bound("x_sum"), None);
    }
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

/// CPU seconds each process spent between two readings, in the order of `after`; a process
/// missing from `before` (not running then) has no figure.
pub fn cpu_between(
    before: &[(u32, ProcStat)],
    after: &[(u32, ProcStat)],
) -> Vec<(u32, Option<f64>)> {
    after
        .iter()
        .map(|(pid, now)| {
            let then = before.iter().find(|(p, _)| p == pid);
            (*pid, then.map(|(_, b)| now.cpu_seconds - b.cpu_seconds))
        })
        .collect()
}

/// A process's RSS in a reading, 0 if it was not running then.
pub fn rss_of(reading: &[(u32, ProcStat)], pid: u32) -> u64 {
    reading
        .iter()
        .find(|(p, _)| *p == pid)
        .map_or(0, |(_, s)| s.rss_bytes)
}

/// How much the processes' RSS grew, in all, between two readings.
pub fn rss_growth(before: &[(u32, ProcStat)], after: &[(u32, ProcStat)]) -> i64 {
    after
        .iter()
        .map(|(pid, now)| now.rss_bytes as i64 - rss_of(before, *pid) as i64)
        .sum()
}
