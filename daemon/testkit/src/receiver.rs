//! A webhook receiver for tests: a plain HTTP/1.1 server on 127.0.0.1 that records every
//! request and answers with a settable status (`Connection: close` after each).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Listens on 127.0.0.1:`port` (0: any free port).
    pub fn start(port: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, rq, sp) = (
            Arc::clone(&status),
            Arc::clone(&requests),
            Arc::clone(&stop),
        );
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        if let Some(r) = read_request(&stream) {
                            rq.lock().unwrap().push(r);
                            let code = st.load(Ordering::Relaxed);
                            let mut s = stream;
                            let _ = write!(
                                s,
                                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver {
            addr,
            status,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the recorded requests.
    pub fn wait(&self, timeout: Duration, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if done(&r) || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops listening; the port is free again when this returns.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn read_request(stream: &std::net::TcpStream) -> Option<Recorded> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(Recorded {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A callback receiver that answers the verifying `PUT` (an empty body) with 200 and then
/// never answers a delivery: it reads each delivery's request, records it, and holds its
/// connection open, unanswered, until the tarpit stops (the receiver a tenant could point
/// its callback at to stall deliveries). [`Tarpit::release`] lets it answer them.
pub struct Tarpit {
    pub addr: SocketAddr,
    held: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Tarpit {
    /// Listens on 127.0.0.1, any free port.
    pub fn start() -> Tarpit {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind tarpit");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (hd, sp, th) = (Arc::clone(&held), Arc::clone(&stop), Arc::clone(&threads));
        let rl = Arc::clone(&release);
        let accept = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (hd, sp, rl) = (Arc::clone(&hd), Arc::clone(&sp), Arc::clone(&rl));
                        let t = std::thread::spawn(move || hold(stream, &hd, &sp, &rl));
                        th.lock().unwrap().push(t);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Tarpit {
            addr,
            held,
            stop,
            release,
            threads,
            accept: Some(accept),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Answers the deliveries held, and every later one, with 200.
    pub fn release(&self) {
        self.release.store(true, Ordering::Relaxed);
    }

    /// The deliveries read and left unanswered so far (answered too, after `release`).
    pub fn held(&self) -> Vec<Recorded> {
        self.held.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the held deliveries.
    pub fn wait(&self, timeout: Duration, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.held();
            if done(&r) || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// One tarpit connection: verifying requests are answered (and the connection closed), a
/// delivery is recorded and its connection held unanswered until `stop` (or answered 200
/// once `release` is set).
fn hold(
    stream: std::net::TcpStream,
    held: &Mutex<Vec<Recorded>>,
    stop: &AtomicBool,
    release: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Some(r) = read_request(&stream) else {
        return;
    };
    if r.body.is_empty() {
        let mut s = stream;
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    held.lock().unwrap().push(r);
    while !stop.load(Ordering::Relaxed) {
        if release.load(Ordering::Relaxed) {
            let mut s = stream;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stream);
}
