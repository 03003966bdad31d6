//! A small blocking HTTP/1.1 client for the agent's two HTTPS uses: enrollment (one JSON
//! `POST`) and artifact downloads (`GET` with `Range`, streamed). One request per connection
//! (`Connection: close`), over rustls with the fleet CA (and the device certificate for
//! downloads), or plain `http://` for development. Bodies framed by `Content-Length`, chunked
//! transfer encoding, or the end of the connection. No redirects, no proxies, no compression.
//!
//! Its own rather than a general client's: the agent needs nothing more, and a general client
//! with its HTTP types and middleware cost about 220 kB of the binary (design decision 7:
//! small; `BENCHMARKS.md`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

/// Where requests go: `http(s)://host[:port][/prefix]`.
#[derive(Clone)]
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    /// The URL's path, without a trailing `/` (often empty).
    prefix: String,
    /// What the `Host` header says.
    authority: String,
    pub connect_timeout: Duration,
    /// The longest wait for any one read or write.
    pub io_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("http::Client").field("host", &self.host).field("port", &self.port).finish()
    }
}

/// One response: status and headers read, the body still on the connection.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Response {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body, decoded from its framing.
    pub fn into_body(self) -> Body {
        self.body
    }

    /// The whole body as text, at most `limit` bytes.
    pub fn read_to_string(self, limit: u64) -> io::Result<String> {
        let mut text = String::new();
        let n = self.body.take(limit + 1).read_to_string(&mut text)?;
        if n as u64 > limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("response body over {limit} bytes")));
        }
        Ok(text)
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// How the body is framed.
enum Framing {
    Length(u64),
    /// Bytes left in the current chunk; `None` before a chunk's size line, `Some(0)` at the
    /// end of a chunk's data.
    Chunked {
        left: Option<u64>,
        done: bool,
    },
    UntilClose,
}

/// A response body; reads end at its end.
pub struct Body {
    conn: BufReader<Conn>,
    framing: Framing,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A line up to CRLF (or LF), without it; at most 8 KiB.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.by_ref().take(8 * 1024).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed"));
    }
    if line.last() != Some(&b'\n') {
        return Err(bad("a header line over 8 KiB"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("a header line that is not UTF-8"))
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Length(0) => Ok(0),
            Framing::Length(left) => {
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed mid-body"));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::UntilClose => self.conn.read(buf),
            Framing::Chunked { done: true, .. } => Ok(0),
            Framing::Chunked { left, done } => loop {
                match *left {
                    None => {
                        let line = read_line(&mut self.conn)?;
                        let size = line.split(';').next().unwrap_or("").trim();
                        let size =
                            u64::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {size:?}")))?;
                        if size == 0 {
                            // Trailers, then the end.
                            while !read_line(&mut self.conn)?.is_empty() {}
                            *done = true;
                            return Ok(0);
                        }
                        *left = Some(size);
                    }
                    Some(0) => {
                        if !read_line(&mut self.conn)?.is_empty() {
                            return Err(bad("no CRLF after a chunk"));
                        }
                        *left = None;
                    }
                    Some(n) => {
                        let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                        let got = self.conn.read(&mut buf[..want])?;
                        if got == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the connection closed mid-chunk",
                            ));
                        }
                        *left = Some(n - got as u64);
                        return Ok(got);
                    }
                }
            },
        }
    }
}

impl Client {
    /// `base` is `https://host[:port][/prefix]` (with `tls`) or `http://…` (without).
    pub fn new(base: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Client, String> {
        let (rest, default_port) = if let Some(r) = base.strip_prefix("https://") {
            if tls.is_none() {
                return Err("https:// needs a TLS configuration".into());
            }
            (r, 443)
        } else if let Some(r) = base.strip_prefix("http://") {
            (r, 80)
        } else {
            return Err(format!("{base:?} must start with https:// or http://"));
        };
        let (hostport, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) =
            crate::config::split_host_port(hostport, default_port).map_err(|e| format!("{base:?}: {e}"))?;
        let authority = if port == default_port {
            hostport.trim_end_matches(&format!(":{port}")[..]).to_string()
        } else {
            hostport.to_string()
        };
        let tls = if base.starts_with("https://") { tls } else { None };
        Ok(Client {
            tls,
            host,
            port,
            prefix: prefix.to_string(),
            authority,
            connect_timeout: Duration::from_secs(15),
            io_timeout: Duration::from_secs(60),
        })
    }

    fn connect(&self) -> io::Result<Conn> {
        let addrs: Vec<_> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{}: no address", self.host));
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.connect_timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_read_timeout(Some(self.io_timeout))?;
        tcp.set_write_timeout(Some(self.io_timeout))?;
        let _ = tcp.set_nodelay(true);
        Ok(match &self.tls {
            None => Conn::Plain(tcp),
            Some(cfg) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| bad(format!("{}: {e}", self.host)))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
                Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        })
    }

    /// `method path` (relative to the base) with `headers` and an optional body; the response
    /// with its status and headers read.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let mut conn = self.connect()?;
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nAccept: */*\r\nConnection: close\r\n",
            self.prefix,
            self.authority,
            crate::AGENT
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())?;
        if let Some(b) = body {
            conn.write_all(b)?;
        }
        conn.flush()?;
        let mut conn = BufReader::new(conn);
        let status_line = read_line(&mut conn)?;
        let mut parts = status_line.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
            _ => None,
        }
        .ok_or_else(|| bad(format!("not an HTTP response: {:?}", status_line.chars().take(64).collect::<String>())))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut conn)?;
            if line.is_empty() {
                break;
            }
            if headers.len() >= 100 {
                return Err(bad("more than 100 response headers"));
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut resp = Response { status, headers, body: Body { conn, framing: Framing::UntilClose } };
        let framing = if resp.header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
            Framing::Chunked { left: None, done: false }
        } else if let Some(len) = resp.header("content-length") {
            Framing::Length(len.trim().parse().map_err(|_| bad(format!("bad Content-Length {len:?}")))?)
        } else if status == 204 || status == 304 || (100..200).contains(&status) || method == "HEAD" {
            Framing::Length(0)
        } else {
            Framing::UntilClose
        };
        resp.body.framing = framing;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot server answering with `answer`; returns the base URL and the request it got.
    fn serve(answer: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut req = String::new();
            loop {
                let line = read_line(&mut r).unwrap();
                req.push_str(&line);
                req.push('\n');
                if line.is_empty() {
                    break;
                }
            }
            if let Some(len) = req.lines().find_map(|l| l.strip_prefix("Content-Length: ")) {
                let mut b = vec![0; len.parse().unwrap()];
                r.read_exact(&mut b).unwrap();
                req.push_str(&String::from_utf8(b).unwrap());
            }
            s.write_all(answer).unwrap();
            req
        });
        (format!("http://127.0.0.1:{port}/base/"), t)
    }

    #[test]
    fn content_length_chunked_and_until_close_bodies() {
        let (url, t) = serve(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\nX-A: b\r\n\r\nhelloEXTRA");
        let c = Client::new(&url, None).unwrap();
        let r = c.request("POST", "/enroll", &[("Content-Type", "application/json")], Some(b"{}")).unwrap();
        assert_eq!((r.status, r.header("x-a")), (201, Some("b")));
        assert_eq!(r.read_to_string(1024).unwrap(), "hello");
        let req = t.join().unwrap();
        assert!(req.starts_with("POST /base/enroll HTTP/1.1\n"), "{req}");
        assert!(req.contains("Content-Length: 2\n") && req.ends_with("\n{}"), "{req}");
        assert!(req.contains(&format!("Host: 127.0.0.1:{}\n", c.port)), "{req}");

        let (url, t) = serve(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n7\r\n, world\r\n0\r\nT: 1\r\n\r\n",
        );
        let r = Client::new(&url, None).unwrap().request("GET", "/a", &[("Range", "bytes=3-")], None).unwrap();
        assert_eq!(r.read_to_string(1024).unwrap(), "hello, world");
        assert!(t.join().unwrap().contains("Range: bytes=3-\n"));

        let (url, t) = serve(b"HTTP/1.0 404 Not Found\r\n\r\nuntil close");
        let r = Client::new(&url, None).unwrap().request("GET", "/a", &[], None).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.read_to_string(1024).unwrap(), "until close");
        t.join().unwrap();
    }

    /// Bad input: a cut body, a body over the limit, garbage instead of HTTP, bad URLs.
    #[test]
    fn bad_answers_and_urls_are_errors() {
        let (url, t) = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort");
        let r = Client::new(&url, None).unwrap().request("GET", "/", &[], None).unwrap();
        assert_eq!(r.read_to_string(1024).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        t.join().unwrap();
        let (url, t) =
            serve(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n01234567890123456789012345678901234567890123456789");
        let r = Client::new(&url, None).unwrap().request("GET", "/", &[], None).unwrap();
        assert!(r.read_to_string(10).unwrap_err().to_string().contains("over 10 bytes"));
        t.join().unwrap();
        let (url, t) = serve(b"SSH-2.0-OpenSSH\r\n\r\n");
        let err = Client::new(&url, None).unwrap().request("GET", "/", &[], None).err().unwrap();
        assert!(err.to_string().contains("not an HTTP response"), "{err}");
        t.join().unwrap();
        assert!(Client::new("ftp://x", None).is_err());
        assert!(Client::new("https://x", None).is_err());
        assert!(Client::new("http://:80", None).is_err());
        let c = Client::new("https://[::1]:8443", Some(Arc::new(test_tls()))).unwrap();
        assert_eq!((c.host.as_str(), c.port, c.authority.as_str()), ("::1", 8443, "[::1]:8443"));
        let c = Client::new("http://example:80/x/", None).unwrap();
        assert_eq!((c.authority.as_str(), c.prefix.as_str()), ("example", "/x"));
    }

    fn test_tls() -> rustls::ClientConfig {
        crate::tls::install_default_provider();
        crate::tls::client_config(rustls::RootCertStore::empty(), None).unwrap()
    }
}
