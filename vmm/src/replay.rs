//! Working sets in a run: the replay a restore starts from a recorded set
//! (`--working-set`), and the recording a run writes at its end
//! (`--save-working-set`).
//!
//! A working set only ever makes a restore faster: a file that cannot be
//! used (unreadable, corrupt, truncated, of another format, or recorded
//! for another image) is reported in the run's `working_set.error` and
//! the restore goes on without replay, the run still judged on what the
//! guest verifies. A recording that cannot be written is a run error: it
//! was asked for and is missing.
//!
//! A recording is bound to the image the next restore serves: the
//! snapshot this run saves, or else the snapshot it restored. A fresh
//! run's own engine serves zeros, an image no restore has.

use std::path::Path;
use std::sync::Arc;

use apf::{Engine, GuestAddress, GuestRam, GuestRange, ImageId, ReplayOptions, SnapshotFile, WorkingSet};

use crate::config::RunConfig;
use crate::report::json_str;
use crate::snapshot;

/// What a run did with working sets, for its report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkingSetReport {
    /// The file replayed (or refused), with `--working-set`.
    pub replayed_from: Option<String>,
    /// Pages in the set replayed (0 when it was refused).
    pub pages: u64,
    /// Pages the replay installed before the run ended (the set's pages the
    /// guest had not faulted in first, and with eager fill, the rest).
    pub replayed_pages: u64,
    /// Pages of those installed before the vCPUs started, within
    /// `--replay-lead` (0 when the set was not all in by then: the rest
    /// went on in the background).
    pub lead_pages: u64,
    /// How long that took, in milliseconds.
    pub lead_ms: f64,
    /// Eager fill after the set.
    pub eager: bool,
    /// Why the set was not replayed.
    pub error: Option<String>,
    /// The file written, with `--save-working-set`.
    pub saved: Option<String>,
    /// Pages in the set written.
    pub saved_pages: u64,
}

impl WorkingSetReport {
    /// The report's `working_set` object.
    pub fn to_json(&self) -> String {
        let opt = |s: &Option<String>| s.as_deref().map_or("null".to_string(), json_str);
        format!(
            "{{\"replayed_from\":{},\"pages\":{},\"replayed_pages\":{},\"lead_pages\":{},\"lead_ms\":{:.3},\"eager\":{},\"error\":{},\"saved\":{},\"saved_pages\":{}}}",
            opt(&self.replayed_from),
            self.pages,
            self.replayed_pages,
            self.lead_pages,
            self.lead_ms,
            self.eager,
            opt(&self.error),
            opt(&self.saved),
            self.saved_pages
        )
    }

    /// The summary's lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(from) = &self.replayed_from {
            match &self.error {
                Some(e) => s.push_str(&format!("replay:   NOT replayed from {from}: {e}\n")),
                None => s.push_str(&format!(
                    "replay:   {} pages in the set from {from}, {} installed by the replay ({} before the vCPUs started, in {:.1} ms){}\n",
                    self.pages,
                    self.replayed_pages,
                    self.lead_pages,
                    self.lead_ms,
                    if self.eager { " (eager fill after it)" } else { "" }
                )),
            }
        }
        if let Some(path) = &self.saved {
            s.push_str(&format!("working set: {} pages saved to {path}\n", self.saved_pages));
        }
        s
    }
}

/// With `--working-set`: loads the set bound to the restored image and
/// starts its replay on `engine`, before any vCPU runs. With
/// `--replay-lead`, the set is installed first on this thread, at full
/// speed and in address order (nothing runs yet that could need one page
/// before another, and runs of neighbours take one install each), until
/// it is in or the lead is spent (REAP's fetch before the guest resumes,
/// bounded). The
/// background replay then goes over the whole set in recorded order,
/// giving way to demand; pages the lead installed are passed over.
/// Whatever goes wrong is recorded in the report, never fatal. Returns
/// the set replayed too, for [`save`] when the run records one.
pub fn start(cfg: &RunConfig, engine: Option<&Engine>) -> (Option<WorkingSetReport>, Option<WorkingSet>) {
    let Some(path) = cfg.working_set.as_ref() else { return (None, None) };
    let mut report = WorkingSetReport {
        replayed_from: Some(path.display().to_string()),
        eager: cfg.replay_eager,
        ..Default::default()
    };
    let Some(engine) = engine else {
        report.error = Some("no engine in this process to replay it".into());
        return (Some(report), None);
    };
    let loaded = engine
        .image_id()
        .map_err(|e| format!("reading the image to identify it: {}", crate::error_chain(&e)))
        .and_then(|id| WorkingSet::load(path, id).map_err(|e| crate::error_chain(&e)));
    match loaded {
        Ok(ws) => {
            let started = if cfg.replay_lead.is_zero() {
                let options = ReplayOptions { eager: cfg.replay_eager, ..ReplayOptions::default() };
                engine.replay_with(&ws, options)
            } else {
                lead(engine, &ws, cfg, &mut report)
            };
            match started {
                Ok(()) => {
                    report.pages = ws.pages.len() as u64;
                    return (Some(report), cfg.save_working_set.is_some().then_some(ws));
                }
                Err(e) => report.error = Some(format!("the replay did not start: {}", crate::error_chain(&e))),
            }
        }
        Err(e) => report.error = Some(e),
    }
    (Some(report), None)
}

/// The replay with a lead: the set, in address order (no vCPU runs yet
/// that could need one page before another, and neighbours go in one
/// window), split in runs over the machine's cores (at most
/// `MAX_REPLAYS - 1`), each at a whole CPU, waited for until it is in or
/// the lead is spent;
/// a set not in by then goes on in the background, giving way to demand.
/// With eager fill, the rest of RAM follows in the background.
fn lead(
    engine: &Engine,
    ws: &WorkingSet,
    cfg: &RunConfig,
    report: &mut WorkingSetReport,
) -> Result<(), apf::EngineError> {
    let started = std::time::Instant::now();
    let mut sorted = ws.pages.clone();
    sorted.sort_unstable();
    // One replay per core, each a run of the sorted set: the lead is
    // nearly all one-page installs (a scattered set), each a `pread` and
    // a `UFFDIO_COPY`, which run side by side; one slot is left for the
    // eager fill.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, apf::MAX_REPLAYS - 1);
    for part in sorted.chunks(sorted.len().div_ceil(threads).max(1)) {
        let part = WorkingSet { pages: part.to_vec(), at_ms: Vec::new() };
        engine.replay_with(&part, ReplayOptions { window_pages: 64, cpu_share: 1.0, eager: false })?;
    }
    if engine.wait_idle(started + cfg.replay_lead) {
        report.lead_pages = engine.stats().replayed_pages;
    }
    report.lead_ms = started.elapsed().as_secs_f64() * 1e3;
    if cfg.replay_eager {
        engine.replay_with(&WorkingSet::default(), ReplayOptions { eager: true, ..ReplayOptions::default() })?;
    }
    Ok(())
}

/// With `--save-working-set`: writes what `engine` recorded, bound to the
/// snapshot this run saved (`saved`), or else to the image it restored.
/// A set this run replayed comes first: the pages the replay installed
/// never faulted, and the saved set would otherwise shrink from one
/// restore to the next. Returns the pages written.
pub fn save(
    path: &Path,
    engine: &Engine,
    ram: &Arc<GuestRam>,
    saved: Option<&Path>,
    replayed: Option<&WorkingSet>,
) -> Result<u64, String> {
    let image = match saved {
        Some(snap) => image_of_snapshot(snap, ram)?,
        None => engine.image_id().map_err(|e| format!("reading the restored image: {}", crate::error_chain(&e)))?,
    };
    let recorded = engine.working_set();
    let ws = replayed.map_or(recorded.clone(), |r| r.then(&recorded));
    ws.save(path, image)
        .map_err(|e| format!("working set not saved to {}: {}", path.display(), crate::error_chain(&e)))?;
    Ok(ws.pages.len() as u64)
}

/// The id a restore of the snapshot at `path` computes: its RAM read the
/// way the restoring engine reads it.
fn image_of_snapshot(path: &Path, ram: &GuestRam) -> Result<ImageId, String> {
    let why =
        |e: &dyn std::error::Error| format!("reading the saved snapshot {}: {}", path.display(), crate::error_chain(e));
    let header = snapshot::open(path).map_err(|e| why(&e))?;
    let layout = vec![(GuestRange::new(GuestAddress(0), header.ram_size), header.ram_offset())];
    let source = SnapshotFile::with_layout(path, layout).map_err(|e| why(&e))?;
    ImageId::of(&source, ram).map_err(|e| why(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_and_summary_say_what_happened() {
        let refused = WorkingSetReport {
            replayed_from: Some("ws".into()),
            error: Some("working-set file is corrupt (checksum mismatch)".into()),
            ..Default::default()
        };
        let j = refused.to_json();
        assert!(j.contains("\"error\":\"working-set file is corrupt (checksum mismatch)\""), "{j}");
        assert!(j.contains("\"pages\":0,\"replayed_pages\":0"), "{j}");
        assert!(
            refused.summary().contains("NOT replayed from ws: working-set file is corrupt"),
            "{}",
            refused.summary()
        );
        let ok = WorkingSetReport {
            replayed_from: Some("ws".into()),
            pages: 10,
            replayed_pages: 7,
            saved: Some("out".into()),
            saved_pages: 12,
            ..Default::default()
        };
        let j = ok.to_json();
        for key in
            ["\"pages\":10,", "\"replayed_pages\":7,", "\"error\":null,", "\"saved\":\"out\",", "\"saved_pages\":12}"]
        {
            assert!(j.contains(key), "{key} missing from {j}");
        }
        assert!(ok.summary().contains("10 pages in the set from ws, 7 installed"), "{}", ok.summary());
        assert!(ok.summary().contains("12 pages saved to out"));
    }
}
