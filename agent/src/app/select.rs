//! `--include` / `--exclude`: which of the node's llama.cpp processes the host agent traces.
//!
//! A selector is `KIND:VALUE`: `exe:GLOB` (the executable's file name or its path as the
//! process sees it), `comm:NAME`, `container:ID` (a prefix of the container id, as `podman ps`
//! shows 12 digits), `namespace:NS` and `pod-label:KEY=VALUE` (Kubernetes). A process is
//! traced if no `--include` is given or one matches, and no `--exclude` matches.

use std::{fmt, str::FromStr};

use globset::{Glob, GlobMatcher};

use crate::sources::{identity::Identity, k8s::PodMeta};

/// One selector.
#[derive(Clone, Debug)]
pub enum Selector {
    Exe(GlobMatcher),
    Comm(String),
    Container(String),
    Namespace(String),
    PodLabel(String, String),
}

impl FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, value) = s.split_once(':').ok_or_else(|| {
            format!("`{s}`: a selector is KIND:VALUE with KIND one of exe, comm, container, namespace, pod-label")
        })?;
        if value.is_empty() {
            return Err(format!("`{s}`: the value after `{kind}:` is empty"));
        }
        Ok(match kind {
            "exe" => Selector::Exe(
                Glob::new(value)
                    .map_err(|e| format!("`{s}`: not a glob ({e})"))?
                    .compile_matcher(),
            ),
            "comm" => Selector::Comm(value.to_string()),
            "container" => Selector::Container(value.to_ascii_lowercase()),
            "namespace" => Selector::Namespace(value.to_string()),
            "pod-label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| format!("`{s}`: pod-label takes KEY=VALUE"))?;
                Selector::PodLabel(k.to_string(), v.to_string())
            }
            other => {
                return Err(format!(
                    "`{s}`: unknown selector kind `{other}` (exe, comm, container, namespace, pod-label)"
                ))
            }
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Exe(g) => write!(f, "exe:{}", g.glob()),
            Selector::Comm(c) => write!(f, "comm:{c}"),
            Selector::Container(c) => write!(f, "container:{c}"),
            Selector::Namespace(n) => write!(f, "namespace:{n}"),
            Selector::PodLabel(k, v) => write!(f, "pod-label:{k}={v}"),
        }
    }
}

/// What a selector is matched against.
pub struct Candidate<'a> {
    pub identity: &'a Identity,
    /// The executable's path as the process sees it.
    pub exe_path: &'a str,
    pub comm: &'a str,
    pub pod: Option<&'a PodMeta>,
}

impl Selector {
    fn matches(&self, c: &Candidate) -> bool {
        match self {
            Selector::Exe(g) => g.is_match(&c.identity.exe) || g.is_match(c.exe_path),
            Selector::Comm(n) => c.comm == n,
            Selector::Container(id) => c
                .identity
                .container_id
                .as_deref()
                .is_some_and(|c| c.starts_with(id.as_str())),
            Selector::Namespace(ns) => c.pod.is_some_and(|p| &p.namespace == ns),
            Selector::PodLabel(k, v) => c.pod.is_some_and(|p| p.labels.get(k) == Some(v)),
        }
    }
}

/// The include and exclude lists.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include: Vec<Selector>,
    pub exclude: Vec<Selector>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether the process is traced.
    pub fn takes(&self, c: &Candidate) -> bool {
        (self.include.is_empty() || self.include.iter().any(|s| s.matches(c)))
            && !self.exclude.iter().any(|s| s.matches(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(exe: &str, container: Option<&str>) -> Identity {
        Identity {
            pid: 1,
            exe: exe.into(),
            container_id: container.map(Into::into),
            pod_uid: None,
            service_name: exe.into(),
        }
    }

    fn sel(include: &[&str], exclude: &[&str]) -> Selection {
        Selection {
            include: include.iter().map(|s| s.parse().unwrap()).collect(),
            exclude: exclude.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn includes_and_excludes_select_by_exe_comm_container_and_pod() {
        let server = ident("llama-server", Some("abcdef0123"));
        let cli = ident("llama-cli", None);
        let cand = |i: &'static Identity, pod: Option<&'static PodMeta>| Candidate {
            identity: i,
            exe_path: "/opt/llama/bin/x",
            comm: "x",
            pod,
        };
        let server: &'static Identity = Box::leak(Box::new(server));
        let cli: &'static Identity = Box::leak(Box::new(cli));
        assert!(sel(&[], &[]).takes(&cand(server, None)));
        let s = sel(&["exe:llama-serv*"], &[]);
        assert!(s.takes(&cand(server, None)) && !s.takes(&cand(cli, None)));
        assert!(sel(&["exe:/opt/llama/**"], &[]).takes(&cand(cli, None)));
        let s = sel(&[], &["container:ABCDEF"]);
        assert!(!s.takes(&cand(server, None)) && s.takes(&cand(cli, None)));
        let pod: &'static PodMeta = Box::leak(Box::new(PodMeta {
            namespace: "inference".into(),
            pod: "p".into(),
            container: None,
            node: "n".into(),
            labels: [("app".to_string(), "llm".to_string())].into(),
        }));
        let s = sel(&["namespace:inference"], &["pod-label:app=other"]);
        assert!(s.takes(&cand(cli, Some(pod))) && !s.takes(&cand(cli, None)));
        assert!(!sel(&["pod-label:app=llm"], &["comm:x"]).takes(&cand(cli, Some(pod))));
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for (s, says) in [
            ("llama-server", "KIND:VALUE"),
            ("exe:", "empty"),
            ("image:x", "unknown selector kind `image`"),
            ("pod-label:app", "KEY=VALUE"),
            ("exe:[", "not a glob"),
        ] {
            let e = s.parse::<Selector>().unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}
