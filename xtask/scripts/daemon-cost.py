#!/usr/bin/env python3
"""The host agent's cost: `llamaprobe daemon` (release build) beside 0, 1 and 4 llama-servers,
idle and under load (one client per server sending 16-token completions back to back, 20 s
each): its CPU (utime + stime over the window), RSS, the llamacpp_ series it serves, events
lost, its decode steps against the servers' own, and each server's exec-to-probes-live time.

Run as root after `cargo build --release -p llamaprobe` and `cargo xtask fixtures`:
    python3 xtask/scripts/daemon-cost.py
(A host-agent section of `cargo xtask bench` comes with the node-scale benchmarks.)
"""
import json, os, subprocess, sys, time, threading, urllib.request, signal
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/llamaprobe")
CACHE = os.path.expanduser("~/.cache/llamaprobe")
FIXTURES = json.load(open(os.environ.get("LLAMAPROBE_FIXTURES", os.path.join(CACHE, "fixtures.json"))))
SRV = next(f["server"] for f in FIXTURES if f["name"] == "newest")
MODEL = os.environ.get("LLAMAPROBE_MODEL", os.path.join(CACHE, "models/tiny.gguf"))
HZ = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1]) / 1024
def get(url):
    try: return urllib.request.urlopen(url, timeout=5).read().decode()
    except Exception: return None
def post(port, prompt, n):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=json.dumps({"prompt": prompt, "n_predict": n}).encode(), headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())
LOG = "/tmp/llamaprobe-daemon-cost.log"
servers = []
d = subprocess.Popen([BIN, "daemon", "--metrics-addr", "127.0.0.1:19470", "--include", "exe:llama-server"], stderr=open(LOG, "w"))
while get("http://127.0.0.1:19470/readyz") != "ready\n": time.sleep(0.05)
def window(label, secs, load_ports):
    stop = time.time() + secs
    done = [0]
    def client(port, k):
        i = 0
        while time.time() < stop:
            post(port, f"client {k} prompt {i} alpha bravo charlie", 16); i += 1; done[0] += 1
    ths = [threading.Thread(target=client, args=(p, k)) for k, p in enumerate(load_ports)]
    c0, t0 = cpu(d.pid), time.time()
    for t in ths: t.start()
    time.sleep(secs)
    for t in ths: t.join()
    c1, t1 = cpu(d.pid), time.time()
    m = get("http://127.0.0.1:19470/metrics") or ""
    series = sum(1 for l in m.splitlines() if l.startswith("llamacpp_"))
    def total(text, name):
        return sum(float(l.rsplit(" ",1)[1]) for l in text.splitlines() if l.startswith(name+"{") or l.startswith(name+" "))
    lost = total(m, "llamaprobe_events_lost_total")
    ours = total(m, "llamacpp_decode_calls_total")
    theirs = sum(total(get(f"http://127.0.0.1:{p}/metrics") or "", "llamacpp:n_decode_total") for _, p in servers)
    print(f"{label}: daemon CPU {100*(c1-c0)/(t1-t0):.2f}% of one core, RSS {rss(d.pid):.1f} MiB, {done[0]} completions, {series} llamacpp_ series, lost {lost:.0f}, decode steps ours {ours:.0f} / servers' {theirs:.0f}", flush=True)
window("0 servers, idle", 20, [])
def start_server():
    port = 18100 + len(servers)
    p = subprocess.Popen([SRV, "-m", MODEL, "--port", str(port), "--metrics", "-c", "2048", "-np", "4", "-t", "1", "--fit", "off", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while "ok" not in (get(f"http://127.0.0.1:{port}/health") or ""): time.sleep(0.1)
    servers.append((p, port))
start_server()
window("1 server, idle", 20, [])
window("1 server, 1 client", 20, [servers[0][1]])
for _ in range(3): start_server()
window("4 servers, idle", 20, [])
window("4 servers, 4 clients", 20, [p for _, p in servers])
for p, _ in servers: p.terminate()
time.sleep(3)
d.send_signal(signal.SIGTERM); d.wait()
for l in open(LOG):
    if "traced" in l: print(l.strip()[:200])
