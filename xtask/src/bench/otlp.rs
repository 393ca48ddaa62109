//! The stand-in OTLP collector section 2's OTLP condition exports to, so that only
//! llamaprobe's side of the export is measured.

use std::{
    io,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context, Result};

/// A stand-in OTLP/HTTP collector on 127.0.0.1 (tiny_http): answers every request with `200
/// OK` and an empty body (an empty protobuf Export*ServiceResponse), and counts requests and
/// body bytes.
pub struct OtlpReceiver {
    pub addr: std::net::SocketAddr,
    server: Arc<tiny_http::Server>,
    counts: Arc<Mutex<(u64, u64)>>,
    serve: Option<thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start() -> Result<OtlpReceiver> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| anyhow::anyhow!("binding the OTLP receiver: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("the OTLP receiver has no IP address")?;
        let server = Arc::new(server);
        let counts = Arc::new(Mutex::new((0, 0)));
        let (server2, counts2) = (server.clone(), counts.clone());
        let serve = thread::spawn(move || {
            for mut req in server2.incoming_requests() {
                let body = io::copy(req.as_reader(), &mut io::sink()).unwrap_or(0);
                if let Ok(mut c) = counts2.lock() {
                    c.0 += 1;
                    c.1 += body;
                }
                let protobuf =
                    tiny_http::Header::from_bytes("Content-Type", "application/x-protobuf")
                        .expect("a valid header");
                let _ = req.respond(tiny_http::Response::empty(200).with_header(protobuf));
            }
        });
        Ok(OtlpReceiver {
            addr,
            server,
            counts,
            serve: Some(serve),
        })
    }

    /// (requests, body bytes) so far.
    pub fn received(&self) -> (u64, u64) {
        self.counts.lock().map(|c| *c).unwrap_or((0, 0))
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(h) = self.serve.take() {
            let _ = h.join();
        }
    }
}
