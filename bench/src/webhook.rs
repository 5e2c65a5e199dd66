//! A minimal HTTP/1.1 webhook receiver on 127.0.0.1 for the notifications scenario: it
//! answers every request 204 on keep-alive connections (one thread per connection) and
//! counts the `notifications` entries of each body it receives.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// A running receiver; its threads end with the process.
pub struct Receiver {
    pub addr: SocketAddr,
    /// `notifications` entries received.
    pub count: Arc<AtomicU64>,
}

pub fn start() -> Result<Receiver> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind the webhook receiver")?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                let _ = serve(stream, &c);
            });
        }
    });
    Ok(Receiver { addr, count })
}

/// The number of `notifications` entries of a notification message (long-poll answer or
/// callback body), counted without building a JSON tree of every entry: the one reader
/// must keep up with the daemon. None when the body is not such a message.
pub fn count_notifications(body: &[u8]) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Batch {
        #[serde(default)]
        notifications: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Batch>(body)
        .ok()
        .map(|b| b.notifications.len())
}

fn serve(stream: TcpStream, count: &AtomicU64) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Request line and headers.
        let mut len = 0usize;
        let mut first = true;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        if let Some(n) = count_notifications(&body) {
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
        out.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")?;
    }
}
