//! `llamaprobe ps`: the llama.cpp processes of the host, found as the daemon finds them,
//! without attaching anything.

use std::collections::HashMap;

use super::host::{cached_symbols, Host};
use crate::{
    discover::{self, OpenVia},
    resolve::Plan,
    sources::{identity, model_path},
};

/// One llama.cpp process.
#[derive(Debug, serde::Serialize)]
pub(super) struct Row {
    pid: u32,
    exe: String,
    generation: &'static str,
    model: String,
    container_id: String,
    pod_uid: String,
}

/// The llama.cpp processes of the host (those whose maps can be read), and how many could not
/// be read.
pub(super) fn survey() -> (Vec<Row>, usize) {
    let me = std::process::id();
    let mut cache = HashMap::new();
    let mut rows = Vec::new();
    let mut unreadable = 0;
    let mut pids = Host::all_pids();
    pids.sort();
    for pid in pids.into_iter().filter(|p| *p != me) {
        let Ok(files) = discover::mapped_files_via(pid, OpenVia::Root) else {
            unreadable += 1;
            continue;
        };
        let what = format!("process {pid}");
        let Ok(plan) = Plan::build_with(&files, &what, |f| cached_symbols(&mut cache, f)) else {
            continue;
        };
        let ident = identity::identify(pid);
        let model = model_path::find(pid)
            .ok()
            .and_then(|m| m.into_iter().next())
            .map(|m| m.label())
            .unwrap_or_default();
        rows.push(Row {
            pid,
            exe: ident.exe,
            generation: plan.generation.as_str(),
            model,
            container_id: ident.container_id.unwrap_or_default(),
            pod_uid: ident.pod_uid.unwrap_or_default(),
        });
    }
    (rows, unreadable)
}

/// The llama.cpp processes of the host.
pub(super) fn llama_processes() -> Vec<Row> {
    survey().0
}

/// Lists them (a table, or JSON lines); exit code 0, or 1 when there is none.
pub fn run(json: bool) -> anyhow::Result<i32> {
    let (rows, unreadable) = survey();
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:>8}  {:<20}  {:<10}  {:<28}  {:<12}  POD UID",
            "PID", "EXE", "GENERATION", "MODEL", "CONTAINER"
        );
        for r in &rows {
            println!(
                "{:>8}  {:<20}  {:<10}  {:<28}  {:<12}  {}",
                r.pid,
                r.exe,
                r.generation,
                r.model,
                r.container_id.get(..12).unwrap_or(&r.container_id),
                r.pod_uid
            );
        }
    }
    if unreadable > 0 && rows.is_empty() {
        eprintln!(
            "llamaprobe: {unreadable} processes could not be read: run as root (sudo) to see every process"
        );
    }
    Ok(if rows.is_empty() { 1 } else { 0 })
}
