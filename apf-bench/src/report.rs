//! What one bench run measured, its ratios against their targets, and
//! its outputs: the JSON document, the table and the chart.

use std::fmt::Write as _;
use std::time::Duration;

use crate::guest_storm::GuestStormFigures;
use crate::{median, PAGE};

/// A JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One measured pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Pages touched.
    pub pages: u64,
    /// Seconds the pass took.
    pub seconds: f64,
    /// Per-fault latency, p50 and p99, when the variant can tell.
    pub latency: Option<(Duration, Duration)>,
}

/// All rounds of one variant of one workload.
#[derive(Debug, Clone)]
pub struct Series {
    /// "kernel", "baseline", "apf", ...
    pub variant: String,
    /// One sample per round.
    pub samples: Vec<Sample>,
}

impl Series {
    /// Median pages per second.
    pub fn pages_per_sec(&self) -> f64 {
        median(self.samples.iter().map(|s| s.pages as f64 / s.seconds.max(1e-9)).collect())
    }

    fn latency_us(&self, which: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.latency.map(|l| if which == 0 { l.0 } else { l.1 }.as_secs_f64() * 1e6))
            .collect();
        (!v.is_empty()).then(|| median(v))
    }
}

/// One workload and its variants.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// "host/seq/zero" and so on.
    pub name: String,
    /// "reads" or "writes".
    pub access: &'static str,
    /// Where the latency comes from.
    pub latency_from: &'static str,
    /// The variants.
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// The run was quick.
    pub quick: bool,
    /// Rounds.
    pub rounds: usize,
    /// Host region size.
    pub host_bytes: u64,
    /// Guest RAM size.
    pub guest_bytes: u64,
    /// Throughput workloads.
    pub workloads: Vec<WorkloadResult>,
    /// Offlining 64 MiB: median ms without pins, with 1,000 pins.
    pub offline_ms: (f64, f64),
    /// What an offline against a hard pin returned.
    pub hard_pin: String,
    /// Fault latency p99 (µs), quiet and with an offline storm.
    pub storm_p99_us: (f64, f64),
    /// The median over rounds of storm p99 over the quiet p99 of the
    /// round before it.
    pub storm_ratio: f64,
    /// Fault latency p50 (µs), quiet and with an offline storm.
    pub storm_p50_us: (f64, f64),
    /// Storm offlines per round.
    pub storm_offlines: u64,
    /// Guest fault latency quiet and next to a storm or a host block
    /// offline, when that part ran.
    pub guest_storm: Option<GuestStormFigures>,
    /// Loading the restore image into a memfd: median ms over rounds.
    pub image_load_ms: f64,
    /// The memory of 4 clones of one image after a read pass, over the
    /// image's size.
    pub clones4_memory: f64,
    /// Pinning 1 GiB of present memory (fault-in excluded): median ms over
    /// 4 KiB pages and over 2 MiB huge pages (0 when not measured).
    pub pin_1gib_ms: (f64, f64),
    /// Wall time of the whole bench.
    pub elapsed: Duration,
    /// Problems (a variant that failed a check).
    pub errors: Vec<String>,
    /// The external handler's restores (`--only handler`).
    pub handler: Option<crate::handler::HandlerFigures>,
    /// Working-set replay (`--only replay`, under KVM).
    pub replay: Option<crate::replay::ReplayFigures>,
}

/// Ratio names, what they compare, and their targets (`>=` when higher
/// is better).
pub const TARGETS: [(&str, f64, bool); 17] = [
    ("host_seq_apf_vs_baseline", 10.0, true),
    ("host_seq_apf_vs_kernel", 2.0, true),
    ("host_random_apf_vs_baseline", 1.0, true),
    ("guest_seq_apf_vs_baseline", 3.0, true),
    ("guest_random_apf_vs_baseline", 1.0, true),
    ("guest_seq_apf_vs_kernel", 0.6, true),
    ("offline_pins_vs_nopin", 1.5, false),
    ("fault_latency_storm_vs_quiet", 2.0, false),
    ("tracing_overhead", 1.05, false),
    ("guest_fault_p99_storm_vs_quiet", 1.5, false),
    ("guest_blocked_per_fault_storm_vs_quiet", 1.5, false),
    ("restore_read_seq_vs_kernel_file", 0.75, true),
    ("restore_read_random_vs_kernel_file", 0.75, true),
    ("restore_write_vs_kernel_file", 3.0, true),
    ("clones4_memory_vs_one_image", 1.3, false),
    ("hugetlb_restore_vs_4k", 2.0, true),
    ("pin_1gib_4k_vs_hugetlb", 50.0, true),
];

impl BenchReport {
    fn workload(&self, name: &str) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The median over rounds of `a`'s throughput over `b`'s in the same
    /// round (pairing cancels drift between rounds); 0 if either is
    /// missing.
    fn ratio(&self, workload: &str, a: &str, b: &str) -> f64 {
        let Some(w) = self.workload(workload) else { return 0.0 };
        let series = |v: &str| w.series.iter().find(|s| s.variant == v);
        let (Some(a), Some(b)) = (series(a), series(b)) else { return 0.0 };
        let rate = |s: &Sample| s.pages as f64 / s.seconds.max(1e-9);
        median(a.samples.iter().zip(&b.samples).map(|(x, y)| rate(x) / rate(y).max(1e-9)).collect())
    }

    /// apf's best restorer over the kernel's file mapping on `workload`:
    /// over 4 KiB pages, or with huge pages too.
    fn best_restore(&self, workload: &str, huge: bool) -> f64 {
        let small = ["apf-zero-copy", "apf-copy"];
        let all = ["apf-zero-copy", "apf-copy", "apf-zero-copy-hugetlb", "apf-copy-hugetlb"];
        let paths: &[&str] = if huge { &all } else { &small };
        paths.iter().map(|v| self.ratio(workload, v, "kernel-file")).fold(0.0, f64::max)
    }

    /// A restore path over 2 MiB huge pages over the same path over
    /// 4 KiB pages on `workload`, for whichever path gains most.
    fn huge_over_small(&self, workload: &str) -> f64 {
        self.ratio(workload, "apf-zero-copy-hugetlb", "apf-zero-copy").max(self.ratio(
            workload,
            "apf-copy-hugetlb",
            "apf-copy",
        ))
    }

    /// apf's best guest restore (copy or zero-copy) over the kernel's file
    /// mapping on `workload`.
    fn best_guest_restore(&self, workload: &str) -> f64 {
        ["apf-zero-copy", "apf", "apf-hugetlb", "apf-zero-copy-hugetlb"]
            .iter()
            .map(|v| self.ratio(workload, v, "kernel-file"))
            .fold(0.0, f64::max)
    }

    /// The ratios, in [`TARGETS`] order, then extra ones.
    pub fn ratios(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("host_seq_apf_vs_baseline", self.ratio("host/seq/file", "apf", "baseline")),
            ("host_seq_apf_vs_kernel", self.ratio("host/seq/zero", "apf", "kernel")),
            ("host_random_apf_vs_baseline", self.ratio("host/random/file", "apf", "baseline")),
            ("guest_seq_apf_vs_baseline", self.ratio("guest/seq/file", "apf", "baseline")),
            ("guest_random_apf_vs_baseline", self.ratio("guest/random/file", "apf", "baseline")),
            ("guest_seq_apf_vs_kernel", self.ratio("guest/seq/zero", "apf", "kernel")),
            ("offline_pins_vs_nopin", self.offline_ms.1 / self.offline_ms.0.max(1e-9)),
            ("fault_latency_storm_vs_quiet", self.storm_ratio),
            ("tracing_overhead", self.ratio("host/random/zero", "apf", "apf-traced")),
            ("restore_read_seq_vs_kernel_file", self.best_restore("host/seq/restore-reads", true)),
            ("restore_read_random_vs_kernel_file", self.best_restore("host/random/restore-reads", true)),
            ("restore_write_vs_kernel_file", self.best_restore("host/seq/restore-writes", true)),
            ("clones4_memory_vs_one_image", self.clones4_memory),
            ("hugetlb_restore_vs_4k", self.huge_over_small("host/seq/restore-reads")),
            ("pin_1gib_4k_vs_hugetlb", {
                let (small, huge) = self.pin_1gib_ms;
                if small > 0.0 && huge > 0.0 {
                    small / huge
                } else {
                    0.0
                }
            }),
            ("tracing_overhead_file", self.ratio("host/random/file", "apf", "apf-traced")),
            ("host_seq_zero_apf_vs_baseline", self.ratio("host/seq/zero", "apf", "baseline")),
            ("host_random_zero_apf_vs_baseline", self.ratio("host/random/zero", "apf", "baseline")),
            ("host_random_apf_vs_kernel", self.ratio("host/random/zero", "apf", "kernel")),
            ("guest_seq_zero_apf_vs_baseline", self.ratio("guest/seq/zero", "apf", "baseline")),
            ("guest_random_zero_apf_vs_baseline", self.ratio("guest/random/zero", "apf", "baseline")),
            ("guest_random_apf_vs_kernel", self.ratio("guest/random/zero", "apf", "kernel")),
            ("restore_write_random_vs_kernel_file", self.best_restore("host/random/restore-writes", true)),
            ("restore_read_write_vs_kernel_file", self.best_restore("host/seq/restore-read-writes", true)),
            ("restore_read_seq_4k_vs_kernel_file", self.best_restore("host/seq/restore-reads", false)),
            ("restore_read_random_4k_vs_kernel_file", self.best_restore("host/random/restore-reads", false)),
            ("restore_write_4k_vs_kernel_file", self.best_restore("host/seq/restore-writes", false)),
            ("hugetlb_restore_copy_vs_4k", self.ratio("host/seq/restore-reads", "apf-copy-hugetlb", "apf-copy")),
            (
                "hugetlb_restore_zero_copy_vs_4k",
                self.ratio("host/seq/restore-reads", "apf-zero-copy-hugetlb", "apf-zero-copy"),
            ),
            ("restore_read_seq_zero_copy_vs_copy", self.ratio("host/seq/restore-reads", "apf-zero-copy", "apf-copy")),
            ("guest_restore_seq_vs_kernel_file", self.best_guest_restore("guest/seq/file")),
            ("guest_restore_random_vs_kernel_file", self.best_guest_restore("guest/random/file")),
            ("guest_hugetlb_restore_vs_4k", self.ratio("guest/seq/file", "apf-hugetlb", "apf")),
            ("guest_hugetlb_restore_random_vs_4k", self.ratio("guest/random/file", "apf-hugetlb", "apf")),
            (
                "guest_hugetlb_zero_copy_restore_vs_4k",
                self.ratio("guest/seq/file", "apf-zero-copy-hugetlb", "apf-zero-copy"),
            ),
        ]
        .into_iter()
        .chain(self.guest_storm_ratios())
        .chain(self.handler_ratios())
        .chain(self.replay.as_ref().map_or_else(crate::replay::ReplayFigures::no_ratios, |r| r.ratios()))
        .collect()
    }

    /// The guest-storm part's ratios (0 each when it did not run).
    fn guest_storm_ratios(&self) -> Vec<(&'static str, f64)> {
        match &self.guest_storm {
            Some(g) => g.ratios(),
            None => crate::guest_storm::RATIO_KEYS.iter().map(|&k| (k, 0.0)).collect(),
        }
    }

    /// The external handler's ratios (host-side clients; none unless the
    /// handler part ran): its first-pass speed over the one-page
    /// handler's and over the file mapping's, in order and at random.
    fn handler_ratios(&self) -> Vec<(&'static str, f64)> {
        let Some(h) = &self.handler else { return Vec::new() };
        let mut guest = Vec::new();
        if h.guest_bytes > 0 {
            guest.push(("handler_guest_seq_vs_one_page", h.guest_ratio(false)));
            guest.push(("handler_guest_random_vs_one_page", h.guest_ratio(true)));
            guest.push(("handler_guest_seq_vs_kernel_file", h.guest_ratio_vs_file(false)));
            guest.push(("handler_guest_random_vs_kernel_file", h.guest_ratio_vs_file(true)));
        }
        guest
            .into_iter()
            .chain([
                ("handler_host_seq_vs_one_page", h.ratio(false, 1, 0)),
                ("handler_host_random_vs_one_page", h.ratio(true, 1, 0)),
                ("handler_host_seq_vs_kernel_file", h.ratio(false, 1, 2)),
                ("handler_host_random_vs_kernel_file", h.ratio(true, 1, 2)),
            ])
            .collect()
    }

    /// The external handler's figures as a JSON object (null if it did not
    /// run).
    fn handler_json(&self) -> String {
        let Some(h) = &self.handler else { return "null".into() };
        let gbps = |rows: &[[f64; 3]], i: usize| {
            let secs = median(rows.iter().map(|r| r[i]).collect());
            h.bytes as f64 / secs.max(1e-9) / 1e9
        };
        serde_json::json!({
            "clients": "host threads (2) in a separate process; the handler in another",
            "bytes": h.bytes,
            "handler_load_ms": median(h.load_ms.clone()),
            "one_page_load_ms": median(h.one_page_load_ms.clone()),
            "seq_gb_per_sec": {"one_page": gbps(&h.seq, 0), "handler": gbps(&h.seq, 1), "kernel_file": gbps(&h.seq, 2)},
            "random_gb_per_sec": {"one_page": gbps(&h.random, 0), "handler": gbps(&h.random, 1), "kernel_file": gbps(&h.random, 2)},
            "guest": {
                "bytes": h.guest_bytes,
                "vcpus": 2,
                "kernel_file": "the snapshot file mapped MAP_PRIVATE as guest RAM (vmm --backend file)",
                "seq_first_pass_s": {"one_page": median(h.guest_seq.iter().map(|r| r[0]).collect()), "handler": median(h.guest_seq.iter().map(|r| r[1]).collect()), "kernel_file": median(h.guest_seq.iter().map(|r| r[2]).collect())},
                "random_first_pass_s": {"one_page": median(h.guest_random.iter().map(|r| r[0]).collect()), "handler": median(h.guest_random.iter().map(|r| r[1]).collect()), "kernel_file": median(h.guest_random.iter().map(|r| r[2]).collect())},
            },
        })
        .to_string()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        let mut j = String::new();
        let _ = write!(
            j,
            "{{\"quick\":{},\"rounds\":{},\"host_bytes\":{},\"guest_bytes\":{},\"elapsed_s\":{:.1},\"cores\":{},\"workloads\":[",
            self.quick,
            self.rounds,
            self.host_bytes,
            self.guest_bytes,
            self.elapsed.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
        let workloads: Vec<String> = self
            .workloads
            .iter()
            .map(|w| {
                let variants: Vec<String> = w
                    .series
                    .iter()
                    .map(|s| {
                        let rate = s.pages_per_sec();
                        let rounds: Vec<String> =
                            s.samples.iter().map(|x| format!("{:.0}", x.pages as f64 / x.seconds.max(1e-9))).collect();
                        format!(
                            "{}:{{\"pages_per_sec\":{rate:.0},\"gb_per_sec\":{:.3},\"p50_us\":{},\"p99_us\":{},\"rounds_pages_per_sec\":[{}]}}",
                            json_str(&s.variant),
                            rate * PAGE as f64 / 1e9,
                            opt(s.latency_us(0)),
                            opt(s.latency_us(1)),
                            rounds.join(",")
                        )
                    })
                    .collect();
                format!(
                    "{{\"name\":{},\"access\":\"{}\",\"latency_from\":{},\"variants\":{{{}}}}}",
                    json_str(&w.name),
                    w.access,
                    json_str(w.latency_from),
                    variants.join(",")
                )
            })
            .collect();
        j.push_str(&workloads.join(","));
        let _ = write!(
            j,
            "],\"offline_64mib_ms\":{{\"no_pins\":{:.2},\"pins_1000\":{:.2}}},\"hard_pin\":{},\"fault_latency_us\":{{\"quiet\":{{\"p50\":{:.1},\"p99\":{:.1}}},\"storm\":{{\"p50\":{:.1},\"p99\":{:.1}}},\"storm_offlines_per_round\":{}}},",
            self.offline_ms.0,
            self.offline_ms.1,
            json_str(&self.hard_pin),
            self.storm_p50_us.0,
            self.storm_p99_us.0,
            self.storm_p50_us.1,
            self.storm_p99_us.1,
            self.storm_offlines
        );
        let _ = write!(
            j,
            "\"restore\":{{\"image_load_ms\":{:.1},\"clones4_memory_vs_one_image\":{:.3},\"pin_1gib_ms\":{{\"4k\":{:.3},\"hugetlb\":{:.3}}}}},",
            self.image_load_ms, self.clones4_memory, self.pin_1gib_ms.0, self.pin_1gib_ms.1
        );
        let _ = write!(j, "\"handler\":{},", self.handler_json());
        let ratios: Vec<String> = self.ratios().iter().map(|(k, v)| format!("\"{k}\":{v:.3}")).collect();
        let targets: Vec<String> = TARGETS
            .iter()
            .map(|(k, t, higher)| {
                format!("\"{k}\":{{\"target\":\"{} {t}\",\"met\":{}}}", if *higher { ">=" } else { "<=" }, self.met(k))
            })
            .collect();
        let errors: Vec<String> = self.errors.iter().map(|e| json_str(e)).collect();
        let handler_load =
            self.handler.as_ref().map_or("null".to_string(), |h| format!("{:.2}", median(h.load_ms.clone())));
        let _ = write!(
            j,
            "\"figures\":{{{},{},\"handler_load_ms\":{handler_load}}},",
            GuestStormFigures::figures_json(self.guest_storm.as_ref()),
            crate::replay::ReplayFigures::figures_json(self.replay.as_ref())
        );
        let _ = write!(
            j,
            "\"ratios\":{{{}}},\"targets\":{{{}}},\"errors\":[{}]}}",
            ratios.join(","),
            targets.join(","),
            errors.join(",")
        );
        j
    }

    /// Whether ratio `name` meets its target.
    pub fn met(&self, name: &str) -> bool {
        let Some(&(_, target, higher)) = TARGETS.iter().find(|t| t.0 == name) else { return false };
        let Some(&(_, v)) = self.ratios().iter().find(|r| r.0 == name) else { return false };
        if higher {
            v >= target
        } else {
            v <= target && v > 0.0
        }
    }

    /// A table for a human.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<20} {:<7} {:<16} {:>12} {:>9} {:>10} {:>10}",
            "workload", "access", "variant", "pages/s", "GB/s", "p50 µs", "p99 µs"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for w in &self.workloads {
            for sr in &w.series {
                let rate = sr.pages_per_sec();
                let _ = writeln!(
                    s,
                    "{:<20} {:<7} {:<16} {:>12.0} {:>9.3} {:>10} {:>10}",
                    w.name,
                    w.access,
                    sr.variant,
                    rate,
                    rate * PAGE as f64 / 1e9,
                    opt(sr.latency_us(0)),
                    opt(sr.latency_us(1))
                );
            }
        }
        let _ = writeln!(
            s,
            "\noffline 64 MiB: {:.2} ms without pins, {:.2} ms with 1,000 pins; hard pin: {}",
            self.offline_ms.0, self.offline_ms.1, self.hard_pin
        );
        let _ = writeln!(
            s,
            "fault latency p50/p99: quiet {:.1}/{:.1} µs, with an offline storm {:.1}/{:.1} µs ({} offlines a round)\n",
            self.storm_p50_us.0, self.storm_p99_us.0, self.storm_p50_us.1, self.storm_p99_us.1, self.storm_offlines
        );
        if let Some(g) = &self.guest_storm {
            s += &g.table();
            s.push('\n');
        }
        if self.image_load_ms > 0.0 {
            let _ = writeln!(
                s,
                "restore: image loaded into a memfd in {:.1} ms ({:.2} GB/s); 4 clones after a read pass use {:.2}x one image",
                self.image_load_ms,
                self.host_bytes as f64 / (self.image_load_ms * 1e6),
                self.clones4_memory
            );
            let _ = writeln!(
                s,
                "pinning 1 GiB of present memory: {:.3} ms over 4 KiB pages, {:.3} ms over 2 MiB huge pages\n",
                self.pin_1gib_ms.0, self.pin_1gib_ms.1
            );
        }
        for (name, v) in self.ratios() {
            if v == 0.0 {
                let _ = writeln!(s, "{name:<42} not measured");
                continue;
            }
            let target = TARGETS.iter().find(|t| t.0 == name);
            let verdict = match target {
                Some((_, t, higher)) => format!(
                    "target {} {t}: {}",
                    if *higher { ">=" } else { "<=" },
                    if self.met(name) { "met" } else { "MISSED" }
                ),
                None => String::new(),
            };
            let _ = writeln!(s, "{name:<42} {v:>8.3}  {verdict}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

/// one bar per variant, on a log scale.
pub fn chart(report: &BenchReport) -> String {
    let rows: Vec<(String, String, f64)> = report
        .workloads
        .iter()
        .flat_map(|w| w.series.iter().map(move |s| (w.name.clone(), s.variant.clone(), s.pages_per_sec())))
        .collect();
    let bar_h = 14.0;
    let gap = 8.0;
    let groups = report.workloads.len() as f64;
    let h = 60.0 + rows.len() as f64 * bar_h + groups * gap + 40.0;
    let (left, width) = (260.0, 560.0);
    let max = rows.iter().map(|r| r.2).fold(1.0f64, f64::max).log10().ceil();
    let min = 3.0f64; // 1,000 pages/s
    let x = |v: f64| left + ((v.max(1.0).log10() - min).max(0.0) / (max - min)) * width;
    let color = |variant: &str| match variant {
        "kernel" => "#7f7f7f",
        "baseline" => "#d62728",
        "apf" => "#1f77b4",
        "apf-traced" => "#17becf",
        "kernel-file" => "#7f7f7f",
        "apf-zero-copy" => "#2ca02c",
        _ => "#9ecae1",
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">",
        left + width + 40.0
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"22\" font-size=\"14\">apf bench: pages per second (log scale), median of {} rounds</text>",
        report.rounds
    );
    let mut dec = min;
    while dec <= max {
        let gx = x(10f64.powf(dec));
        let _ = writeln!(s, "<line x1=\"{gx:.1}\" y1=\"40\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>", h - 30.0);
        let _ = writeln!(s, "<text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">1e{dec}</text>", h - 15.0);
        dec += 1.0;
    }
    let mut y = 50.0;
    let mut last = String::new();
    for (workload, variant, rate) in &rows {
        if *workload != last {
            y += gap;
            last = workload.clone();
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{workload} {variant}</text>",
            left - 6.0,
            y + bar_h - 4.0
        );
        let _ = writeln!(
            s,
            "<rect class=\"bar\" x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
            x(*rate) - left,
            bar_h - 2.0,
            color(variant)
        );
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">{rate:.0}</text>", x(*rate) + 4.0, y + bar_h - 4.0);
        y += bar_h;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(variant: &str, rates: &[f64]) -> Series {
        let samples = rates.iter().map(|&r| Sample { pages: r as u64, seconds: 1.0, latency: None }).collect();
        Series { variant: variant.into(), samples }
    }

    fn workload(name: &str, series: Vec<Series>) -> WorkloadResult {
        WorkloadResult { name: name.into(), access: "reads", latency_from: "", series }
    }

    #[test]
    fn ratios_are_medians_over_medians() {
        let report = BenchReport {
            workloads: vec![
                workload(
                    "host/seq/file",
                    vec![
                        series("baseline", &[10.0, 1000.0, 12.0, 11.0, 9.0]),
                        series("apf", &[300.0, 310.0, 1.0, 290.0, 305.0]),
                    ],
                ),
                workload("host/random/zero", vec![series("apf", &[100.0; 5]), series("apf-traced", &[98.0; 5])]),
            ],
            offline_ms: (20.0, 25.0),
            storm_p99_us: (30.0, 90.0),
            storm_ratio: 3.0,
            ..BenchReport::default()
        };
        let r: std::collections::HashMap<_, _> = report.ratios().into_iter().collect();
        // Paired by round, then the median: outlier rounds move nothing.
        // Per round: 30, 0.31, 0.083, 26.4, 33.9.
        assert!((r["host_seq_apf_vs_baseline"] - 290.0 / 11.0).abs() < 1e-9);
        assert!((r["tracing_overhead"] - 100.0 / 98.0).abs() < 1e-9);
        assert_eq!(r["offline_pins_vs_nopin"], 1.25);
        assert!(report.met("host_seq_apf_vs_baseline") && report.met("tracing_overhead"));
        assert!(!report.met("fault_latency_storm_vs_quiet"), "3x is over the 2x target");
        // A workload that did not run is 0, which meets no target.
        assert_eq!(r["guest_seq_apf_vs_kernel"], 0.0);
        assert!(!report.met("guest_seq_apf_vs_kernel"));

        let json = report.to_json();
        for (name, _, _) in TARGETS {
            assert!(json.contains(&format!("\"{name}\":")), "{name} missing");
        }
        let svg = chart(&report);
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 4);
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    /// The keys the guest-storm part must write, as `object.key`.
    const GUEST_STORM_KEYS: [&str; 18] = [
        "figures.guest_fault_p99_us_quiet",
        "figures.guest_fault_p999_us_quiet",
        "figures.guest_fault_p99_us_quiet_guest_view",
        "figures.guest_fault_p999_us_quiet_guest_view",
        "ratios.guest_fault_p99_storm_vs_quiet",
        "ratios.guest_fault_p99_storm_vs_quiet_guest_view",
        "figures.guest_fault_p999_us_storm",
        "figures.guest_fault_max_us_storm",
        "figures.guest_fault_p999_us_storm_guest_view",
        "figures.guest_fault_max_us_storm_guest_view",
        "ratios.guest_blocked_per_fault_storm_vs_quiet",
        "figures.storm_refaulted_pages",
        "figures.pin_refault_p99_us",
        "figures.pin_callback_p99_us",
        "figures.offline_64mib_ms",
        "figures.host_block_fault_p99_us",
        "figures.host_block_fault_max_us",
        "targets.guest_fault_p99_storm_vs_quiet",
    ];

    #[test]
    fn the_json_carries_every_replay_key() {
        use crate::replay::{ReplayFigures, ReplaySample};
        const KEYS: [&str; 6] = [
            "ratios.replay_first_pass_vs_on_demand",
            "ratios.replay_first_pass_vs_kernel_file",
            "ratios.replay_first_pass_vs_eager",
            "figures.replay_faults",
            "figures.on_demand_faults",
            "ratios.replay_fault_p99_vs_none",
        ];
        let json: serde_json::Value = serde_json::from_str(&BenchReport::default().to_json()).unwrap();
        for key in KEYS {
            let v = lookup(&json, key).unwrap_or_else(|| panic!("{key} missing when the part did not run"));
            assert!(if key.starts_with("figures.") { v.is_null() } else { v.as_f64() == Some(0.0) }, "{key}: {v}");
        }
        let s = |seconds: f64, faults: u64| {
            Some(ReplaySample {
                seconds,
                faults: Some(faults),
                blocked_us: Some(5.0),
                fault_p99_us: Some(40.0),
                replayed_pages: 3,
            })
        };
        let round = [
            s(0.9, 900),
            s(0.3, 30),
            s(0.3, 20),
            s(0.8, 800),
            Some(ReplaySample { seconds: 0.6, ..Default::default() }),
        ];
        let report = BenchReport {
            replay: Some(ReplayFigures {
                bytes: 1 << 20,
                set_pages: 9,
                rounds: vec![round; 5],
                cold_rounds: vec![round; 5],
                ..ReplayFigures::default()
            }),
            ..BenchReport::default()
        };
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for key in KEYS {
            let v = lookup(&json, key).unwrap_or_else(|| panic!("{key} missing"));
            assert!(v.as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
        }
        assert_eq!(lookup(&json, "figures.replay_faults").unwrap().as_f64(), Some(30.0));
        assert_eq!(lookup(&json, "ratios.replay_first_pass_vs_on_demand").unwrap().as_f64(), Some(3.0));
    }

    fn lookup<'a>(json: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
        let (object, name) = key.split_once('.').unwrap();
        json.get(object)?.get(name)
    }

    #[test]
    fn the_json_carries_every_guest_storm_key() {
        use crate::guest_storm::{GuestStormFigures, GuestStormSample, Tail, BENCH_STORM};
        // Not run: every key is there, figures null, ratios 0.
        let json: serde_json::Value = serde_json::from_str(&BenchReport::default().to_json()).unwrap();
        for key in GUEST_STORM_KEYS {
            let v = lookup(&json, key).unwrap_or_else(|| panic!("{key} missing"));
            if key.starts_with("figures.") {
                assert!(v.is_null(), "{key} is {v} though nothing was measured");
            }
        }
        // Measured (a synthetic set of rounds; no block qualified).
        let tail = |p99: f64| Some(Tail { p99_us: p99, p999_us: 3.0 * p99, max_us: 9.0 * p99 });
        let run = |p99: f64, faults: u64, blocked_us: f64, host_block: &str| GuestStormSample {
            engine: tail(p99),
            guest: tail(2.0 * p99),
            guest_touch: tail(3.0 * p99),
            guest_stress: tail(4.0 * p99),
            vcpu_faults: faults,
            vcpu_blocked_us: blocked_us,
            deferred_faults: 3,
            pin_refault_p99_us: Some(1500.0),
            pin_callback_p99_us: Some(0.1),
            offlines: 20,
            host_block: host_block.into(),
            tail_causes_pct: vec![("lock", 5.0), ("other", 95.0)],
        };
        let report = BenchReport {
            guest_storm: Some(GuestStormFigures {
                bytes: 128 << 20,
                storm: Some(BENCH_STORM),
                rounds: vec![(run(200.0, 500, 10_000.0, "off"), run(400.0, 600, 30_000.0, "off")); 5],
                host_block: vec![run(100.0, 500, 1.0, "none qualified")],
                offline_64mib_ms: Some(40.0),
            }),
            ..BenchReport::default()
        };
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for key in GUEST_STORM_KEYS {
            let v = lookup(&json, key).unwrap_or_else(|| panic!("{key} missing"));
            let null_here = key.starts_with("figures.host_block") || key.starts_with("targets.");
            assert!(null_here || v.is_number(), "{key} is {v}");
        }
        let num = |k: &str| lookup(&json, k).and_then(|v| v.as_f64()).unwrap();
        assert_eq!(num("figures.guest_fault_p99_us_quiet"), 200.0);
        assert_eq!(num("figures.guest_fault_p99_us_quiet_guest_view"), 400.0);
        assert_eq!(num("figures.guest_fault_max_us_storm"), 3600.0);
        assert_eq!(num("ratios.guest_fault_p99_storm_vs_quiet"), 2.0);
        assert_eq!(num("ratios.guest_blocked_per_fault_storm_vs_quiet"), 2.5);
        assert_eq!(num("figures.storm_refaulted_pages"), 100.0);
        assert_eq!(num("figures.offline_64mib_ms"), 40.0);
        assert!(lookup(&json, "figures.host_block_fault_p99_us").unwrap().is_null(), "no block qualified");
        assert!(!report.met("guest_fault_p99_storm_vs_quiet"), "2x is over the 1.5x target");
        assert!(report.table().contains("guest faults (128 MiB, 5 rounds"));
    }
}
