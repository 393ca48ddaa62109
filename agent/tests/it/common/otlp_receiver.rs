//! A real OTLP receiver for the tests: gRPC (`TraceService` and `MetricsService` served by
//! tonic on the official OTLP protobuf definitions) and a small OTLP/HTTP (protobuf) one, each on
//! 127.0.0.1 on a runtime of its own, keeping every request it got.
//!
//! Included with `#[path = "common/otlp_receiver.rs"] mod otlp_receiver;` by the test files that
//! export over OTLP (otlp.rs, resources.rs), so the others do not build a gRPC server.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            metrics_service_server::{MetricsService, MetricsServiceServer},
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        },
        trace::v1::{
            trace_service_server::{TraceService, TraceServiceServer},
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        },
    },
    common::v1::{any_value::Value as Any, KeyValue},
    metrics::v1::{metric::Data, number_data_point::Value as Number, Metric},
    trace::v1::Span,
};

/// The attributes of a resource, in the request's order.
pub type ResourceAttrs = Vec<(String, Any)>;

/// What a receiver got.
#[derive(Clone, Default)]
pub struct Received {
    pub traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

/// One number data point of a gauge or a sum, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// `gauge`, or `sum` with its monotonicity: `sum` (monotonic) or `updown`.
    pub kind: &'static str,
    pub unit: String,
    pub value: PointValue,
    /// Attribute key → value, in the request's order.
    pub attributes: Vec<(String, Any)>,
}

/// The value of a number data point: OTLP keeps integers and doubles apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PointValue {
    Int(i64),
    Double(f64),
}

impl Point {
    /// The attribute `key`, if present.
    pub fn attr(&self, key: &str) -> Option<&Any> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

fn attributes(kvs: &[KeyValue]) -> Vec<(String, Any)> {
    kvs.iter()
        .filter_map(|kv| {
            let v = kv.value.as_ref()?.value.clone()?;
            Some((kv.key.clone(), v))
        })
        .collect()
}

impl Received {
    pub fn spans(&self) -> Vec<Span> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// Every span with the attributes of the resource it was exported under.
    pub fn spans_by_resource(&self) -> Vec<(ResourceAttrs, Span)> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| {
                let resource = attributes(
                    r.resource
                        .as_ref()
                        .map(|r| r.attributes.as_slice())
                        .unwrap_or_default(),
                );
                r.scope_spans
                    .iter()
                    .flat_map(|s| s.spans.clone())
                    .map(move |span| (resource.clone(), span))
            })
            .collect()
    }

    /// The names of the metrics of every export, with the attributes of their resource.
    pub fn metrics_by_resource(&self) -> Vec<(ResourceAttrs, Vec<String>)> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .flat_map(|req| &req.resource_metrics)
            .map(|r| {
                let resource = attributes(
                    r.resource
                        .as_ref()
                        .map(|r| r.attributes.as_slice())
                        .unwrap_or_default(),
                );
                let names = r
                    .scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                    .map(|m| m.name.clone())
                    .collect();
                (resource, names)
            })
            .collect()
    }

    /// Every metric of every export, in the order received (one entry per export of a metric).
    pub fn metric_exports(&self) -> Vec<Vec<Metric>> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .map(|req| {
                req.resource_metrics
                    .iter()
                    .flat_map(|r| &r.scope_metrics)
                    .flat_map(|s| s.metrics.clone())
                    .collect()
            })
            .collect()
    }

    /// Histogram name → (unit, explicit bounds, total count) from the latest export (cumulative).
    pub fn histograms(&self) -> HashMap<String, (String, Vec<f64>, u64)> {
        let mut out = HashMap::new();
        for m in self.metric_exports().into_iter().flatten() {
            if let Some(Data::Histogram(h)) = &m.data {
                let bounds = h
                    .data_points
                    .first()
                    .map(|p| p.explicit_bounds.clone())
                    .unwrap_or_default();
                let count = h.data_points.iter().map(|p| p.count).sum();
                out.insert(m.name.clone(), (m.unit.clone(), bounds, count));
            }
        }
        out
    }
}

/// The gauge and sum data points of one export's metrics, by metric name.
pub fn number_points(metrics: &[Metric]) -> HashMap<String, Vec<Point>> {
    let mut out: HashMap<String, Vec<Point>> = HashMap::new();
    for m in metrics {
        let (kind, points) = match &m.data {
            Some(Data::Gauge(g)) => ("gauge", &g.data_points),
            Some(Data::Sum(s)) if s.is_monotonic => ("sum", &s.data_points),
            Some(Data::Sum(s)) => ("updown", &s.data_points),
            _ => continue,
        };
        let list = out.entry(m.name.clone()).or_default();
        for p in points {
            let value = match p.value {
                Some(Number::AsInt(v)) => PointValue::Int(v),
                Some(Number::AsDouble(v)) => PointValue::Double(v),
                None => panic!("{}: a data point without a value", m.name),
            };
            list.push(Point {
                kind,
                unit: m.unit.clone(),
                value,
                attributes: attributes(&p.attributes),
            });
        }
    }
    out
}

#[derive(Clone)]
struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// An OTLP receiver listening on 127.0.0.1:port, on its own runtime.
pub struct Receiver {
    pub got: Received,
    _rt: tokio::runtime::Runtime,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The gRPC receiver (TraceService and MetricsService of the OTLP protos).
pub fn grpc_receiver(port: u16) -> Receiver {
    let rt = runtime();
    let got = Received::default();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("bind the receiver");
    let c = Collector(got.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .add_service(MetricsServiceServer::new(c))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Receiver { got, _rt: rt }
}

/// A small OTLP/HTTP (protobuf) receiver: POST /v1/traces and /v1/metrics.
pub fn http_receiver(port: u16) -> Receiver {
    use http_body_util::{BodyExt, Full};
    use hyper::{body::Bytes, service::service_fn, Response};
    use prost::Message;
    let rt = runtime();
    let got = Received::default();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("bind the receiver");
    let g = got.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let g = g.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let g = g.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let reply = match path.as_str() {
                            "/v1/traces" => {
                                let r = ExportTraceServiceRequest::decode(body).expect("protobuf");
                                g.traces.lock().unwrap().push(r);
                                ExportTraceServiceResponse::default().encode_to_vec()
                            }
                            "/v1/metrics" => {
                                let r =
                                    ExportMetricsServiceRequest::decode(body).expect("protobuf");
                                g.metrics.lock().unwrap().push(r);
                                ExportMetricsServiceResponse::default().encode_to_vec()
                            }
                            other => panic!("unexpected OTLP path {other}"),
                        };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::from(reply)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Receiver { got, _rt: rt }
}
