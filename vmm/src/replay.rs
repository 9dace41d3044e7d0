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
    /// `--replay-lead`.
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
/// `--replay-lead`, the set's head is installed first on this thread, at
/// full speed, until the set is in or the lead is spent (REAP's fetch
/// before the guest resumes, bounded): nothing competes with it yet. The
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
            if !cfg.replay_lead.is_zero() {
                let started = std::time::Instant::now();
                report.lead_pages = lead(engine, &ws, started + cfg.replay_lead);
                report.lead_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            let options = ReplayOptions { eager: cfg.replay_eager, ..ReplayOptions::default() };
            match engine.replay_with(&ws, options) {
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

/// Installs the set's pages in recorded order, a run of contiguous pages
/// at a time, until they are all in or `deadline` passes. Returns the pages
/// installed. A run the engine refuses (it stopped) ends the lead: the
/// background replay and demand faults still cover it.
fn lead(engine: &Engine, ws: &WorkingSet, deadline: std::time::Instant) -> u64 {
    let mut installed = 0;
    for (first, pages) in runs(&ws.pages) {
        if std::time::Instant::now() >= deadline {
            break;
        }
        match engine.prefetch(GuestRange::new(GuestAddress(first), pages * apf::PAGE_SIZE as u64)) {
            Ok(n) => installed += n,
            Err(_) => break,
        }
    }
    installed
}

/// Runs of contiguous pages in `pages`, in order: (first address, pages).
/// A run is cut at 64 pages, so the deadline is checked often.
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let page = apf::PAGE_SIZE as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &gpa in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n * page == gpa && *n < 64 => *n += 1,
            _ => out.push((gpa, 1)),
        }
    }
    out
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

    #[test]
    fn the_lead_goes_by_runs_of_contiguous_pages_in_order() {
        let p = |n: u64| n * 4096;
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[p(5), p(6), p(7), p(2), p(3), p(9)]), [(p(5), 3), (p(2), 2), (p(9), 1)]);
        let long: Vec<u64> = (0..130).map(p).collect();
        assert_eq!(runs(&long), [(0, 64), (p(64), 64), (p(128), 2)], "runs are cut at 64 pages");
        assert_eq!(runs(&[p(3), p(2)]), [(p(3), 1), (p(2), 1)], "descending pages are separate runs");
    }
}
