//! `--events-out FILE`: every observation as one JSON line, for scripts and tests.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use super::{SelfStats, Sink};
use crate::model::Observation;

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

    fn tick(&mut self, _: &SelfStats) {
        let _ = self.out.flush();
    }

    fn finish(&mut self, _: &SelfStats) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}
