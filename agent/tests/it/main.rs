//! llamaprobe's integration tests, in one binary so that the suite links once: the real eBPF
//! programs in this kernel against fake and real llama.cpp builds, the OTLP and Prometheus
//! exports against real receivers, the resources beside the probes, and bad input.

mod common;

mod architecture;
mod bad_input;
mod compose;
mod cpu_profile;
mod daemon;
mod daemon_container;
mod daemon_k8s;
mod dashboards;
mod deploy_image;
mod deploy_kubernetes;
mod deploy_systemd;
mod doctor;
mod embedders;
mod fake_targets;
mod faults;
mod hostile_files;
mod llama_server;
mod matrix;
mod otlp;
mod privileges;
mod resources;
mod rules;
mod web_config;
