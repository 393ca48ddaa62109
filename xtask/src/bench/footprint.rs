//! Section 5, llamaprobe's footprint while idle: attached to section 2's llama-server on the
//! tiny model with no requests, its RSS, peak RSS and CPU time. Its footprint under load is
//! measured by section 2's runs with llamaprobe attached
//! ([`AgentServer`](super::throughput::AgentServer)).

use std::{thread, time::Instant};

use anyhow::{Context, Result};

use crate::{server::Server, util::progress};

use super::{
    llama_server::{attach, detach},
    procfs::{cpu_ms, memory_kib},
    stats::mib,
    Env,
};

pub struct Idle {
    pub secs: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub cpu_ms: f64,
}

pub fn measure_idle(env: &Env, server: &Server) -> Result<Idle> {
    progress!(
        "idle: llamaprobe attached, no requests, {} s",
        env.cfg.idle.as_secs()
    );
    let summary = env.work.join("summary-idle.json");
    let p = attach(env, server.proc.pid(), &[], &summary)?;
    let cpu0 = cpu_ms(p.pid()).context("reading llamaprobe's CPU time")?;
    let t0 = Instant::now();
    thread::sleep(env.cfg.idle);
    let cpu1 = cpu_ms(p.pid()).context("reading llamaprobe's CPU time")?;
    let secs = t0.elapsed().as_secs_f64();
    let (rss, hwm) = memory_kib(p.pid()).context("reading llamaprobe's memory")?;
    detach(p, &summary)?;
    let idle = Idle {
        secs,
        rss_kib: rss,
        hwm_kib: hwm,
        cpu_ms: cpu1 - cpu0,
    };
    progress!(
        "  RSS {:.1} MiB (peak {:.1} MiB), CPU {:.0} ms in {:.1} s",
        mib(idle.rss_kib),
        mib(idle.hwm_kib),
        idle.cpu_ms,
        idle.secs
    );
    Ok(idle)
}
