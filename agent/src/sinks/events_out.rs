//! `--events-out FILE`: every observation as one JSON line, for scripts and tests.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use super::{Sink, Snapshot};
use crate::model::Observation;

/// The JSON-lines sink's options.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "events_out_options")]
#[command(next_help_heading = "Files")]
pub struct Options {
    /// Write every observation (decode step, sample, load, ...) as a JSON line to FILE.
    #[arg(long, value_name = "FILE", env = "LLAMAPROBE_EVENTS_OUT")]
    pub events_out: Option<std::path::PathBuf>,
}

pub struct EventsOut {
    out: BufWriter<File>,
    failed: bool,
}

impl EventsOut {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let f = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create --events-out {}: {e}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(f),
            failed: false,
        })
    }
}

impl Sink for EventsOut {
    fn observe(&mut self, obs: &Observation) {
        if self.failed {
            return;
        }
        let r = serde_json::to_writer(&mut self.out, obs)
            .map_err(std::io::Error::from)
            .and_then(|_| self.out.write_all(b"\n"));
        if let Err(e) = r {
            tracing::error!("--events-out: write failed, no more events will be written: {e}");
            self.failed = true;
        }
    }

    fn tick(&mut self, _: &Snapshot) {
        let _ = self.out.flush();
    }

    fn finish(&mut self, _: &Snapshot) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}
