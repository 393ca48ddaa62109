//! The stand-in OTLP collector section 2's OTLP condition and section 6 export to, so that only
//! llamaprobe's side of the export is measured.

use std::{
    io,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// What the receiver got so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Received {
    /// Every request, any path.
    pub requests: u64,
    pub body_bytes: u64,
    /// Requests to `/v1/traces`.
    pub trace_requests: u64,
    /// Spans in the `/v1/traces` requests that decoded as an `ExportTraceServiceRequest`.
    pub spans: u64,
    /// `/v1/traces` requests whose body did not decode (compressed, or not OTLP/protobuf).
    pub undecodable: u64,
}

/// A stand-in OTLP/HTTP collector on 127.0.0.1 (tiny_http): answers every request with `200
/// OK` and an empty body (an empty protobuf Export*ServiceResponse), counts requests and body
/// bytes, and decodes trace exports (`/v1/traces`, protobuf) to count their spans.
pub struct OtlpReceiver {
    pub addr: std::net::SocketAddr,
    server: Arc<tiny_http::Server>,
    counts: Arc<Mutex<Received>>,
    serve: Option<thread::JoinHandle<()>>,
}

/// The spans of one `/v1/traces` body; None if it is not an ExportTraceServiceRequest.
fn spans_in(body: &[u8]) -> Option<u64> {
    let req = ExportTraceServiceRequest::decode(body).ok()?;
    Some(
        req.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len() as u64)
            .sum(),
    )
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
        let counts = Arc::new(Mutex::new(Received::default()));
        let (server2, counts2) = (server.clone(), counts.clone());
        let serve = thread::spawn(move || {
            for mut req in server2.incoming_requests() {
                let traces = req.url().split('?').next() == Some("/v1/traces");
                let mut body = Vec::new();
                let len = if traces {
                    req.as_reader().read_to_end(&mut body).unwrap_or(0) as u64
                } else {
                    io::copy(req.as_reader(), &mut io::sink()).unwrap_or(0)
                };
                if let Ok(mut c) = counts2.lock() {
                    c.requests += 1;
                    c.body_bytes += len;
                    if traces {
                        c.trace_requests += 1;
                        match spans_in(&body) {
                            Some(n) => c.spans += n,
                            None => c.undecodable += 1,
                        }
                    }
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
        let c = self.counts();
        (c.requests, c.body_bytes)
    }

    /// Everything counted so far, spans included.
    pub fn counts(&self) -> Received {
        self.counts.lock().map(|c| *c).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    #[test]
    fn counts_the_spans_of_a_trace_export() {
        let span = || Span {
            name: "s".into(),
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![
                    ScopeSpans {
                        spans: vec![span(), span()],
                        ..Default::default()
                    },
                    ScopeSpans {
                        spans: vec![span()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        };
        assert_eq!(spans_in(&req.encode_to_vec()), Some(3));
        // Field 1, 5 bytes long, cut short.
        assert_eq!(spans_in(&[0x0a, 0x05, 0x01]), None);
    }
}
