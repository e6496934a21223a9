//! What a mini-cluster gives back to the shared services when it is dropped: its keyspace and
//! its NATS streams, through minimal blocking CQL and NATS exchanges (no runtime is needed in
//! `Drop`).

use std::time::Duration;

use crate::util::random_hex;

/// Runs `action` on each entry of a comma-separated list until one succeeds; the last error
/// if none does.
pub(super) fn on_any(list: &str, action: impl Fn(&str) -> Result<(), String>) -> Result<(), String> {
    let mut last = Err(format!("the list {list:?} is empty"));
    for entry in list.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        last = action(entry);
        if last.is_ok() {
            break;
        }
    }
    last
}

/// `DROP KEYSPACE IF EXISTS` through a minimal CQL v4 exchange (STARTUP, QUERY), blocking.
pub fn drop_keyspace(cql_nodes: &str, keyspace: &str) -> Result<(), String> {
    use std::io::{Read, Write};

    fn frame(stream: i16, opcode: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x04, 0x00];
        out.extend_from_slice(&stream.to_be_bytes());
        out.push(opcode);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }
    fn short_string(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    fn answer(conn: &mut std::net::TcpStream) -> Result<(u8, Vec<u8>), String> {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).map_err(|err| err.to_string())?;
        let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
        let mut body = vec![0; len];
        conn.read_exact(&mut body).map_err(|err| err.to_string())?;
        Ok((head[4], body))
    }
    fn error_text(body: &[u8]) -> String {
        String::from_utf8_lossy(body.get(6..).unwrap_or_default()).into_owned()
    }

    let node = cql_nodes.split(',').next().unwrap_or_default().trim();
    let addr: std::net::SocketAddr = node.parse().map_err(|err| format!("{node}: {err}"))?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|err| format!("connect {node}: {err}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|err| err.to_string())?;
    let mut startup = 1u16.to_be_bytes().to_vec();
    short_string(&mut startup, "CQL_VERSION");
    short_string(&mut startup, "3.0.0");
    conn.write_all(&frame(0, 0x01, &startup))
        .map_err(|err| err.to_string())?;
    match answer(&mut conn)? {
        (0x02, _) => {}
        (opcode, body) => return Err(format!("STARTUP answered {opcode:#x}: {}", error_text(&body))),
    }
    let query = format!("DROP KEYSPACE IF EXISTS {keyspace}");
    let mut body = (query.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(query.as_bytes());
    // Consistency ONE, no flags.
    body.extend_from_slice(&[0x00, 0x01, 0x00]);
    conn.write_all(&frame(1, 0x07, &body))
        .map_err(|err| err.to_string())?;
    match answer(&mut conn)? {
        (0x08, _) => Ok(()),
        (opcode, body) => Err(format!("{query} answered {opcode:#x}: {}", error_text(&body))),
    }
}

/// Deletes every JetStream stream that captures `subject`, through a minimal NATS exchange
/// (`$JS.API.STREAM.NAMES`, then `$JS.API.STREAM.DELETE.<name>`), blocking.
pub fn delete_streams(nats_url: &str, subject: &str) -> Result<(), String> {
    use std::io::{BufRead, Read, Write};

    let host = nats_url
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("nats://");
    let addr: std::net::SocketAddr = host.parse().map_err(|err| format!("{host}: {err}"))?;
    let conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|err| format!("connect {host}: {err}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|err| err.to_string())?;
    let mut writer = conn.try_clone().map_err(|err| err.to_string())?;
    let mut reader = std::io::BufReader::new(conn);
    let inbox = format!("_INBOX.e2e{}", random_hex(16));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).map_err(|err| err.to_string())?;
    if !greeting.starts_with("INFO") {
        return Err(format!("unexpected greeting {greeting:?}"));
    }
    let connect = format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {inbox} 1\r\n");
    writer
        .write_all(connect.as_bytes())
        .map_err(|err| err.to_string())?;
    let mut request = |subject: &str, payload: &str| -> Result<serde_json::Value, String> {
        let publish = format!("PUB {subject} {inbox} {}\r\n{payload}\r\n", payload.len());
        writer
            .write_all(publish.as_bytes())
            .map_err(|err| err.to_string())?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(|err| err.to_string())? == 0 {
                return Err("NATS closed the connection".into());
            }
            if line.starts_with("PING") {
                writer.write_all(b"PONG\r\n").map_err(|err| err.to_string())?;
            } else if line.starts_with("-ERR") {
                return Err(line.trim().to_owned());
            } else if line.starts_with("MSG ") {
                let len: usize = line
                    .split_whitespace()
                    .last()
                    .and_then(|len| len.parse().ok())
                    .ok_or_else(|| format!("bad MSG line {line:?}"))?;
                let mut payload = vec![0; len + 2];
                reader.read_exact(&mut payload).map_err(|err| err.to_string())?;
                return serde_json::from_slice(&payload[..len]).map_err(|err| err.to_string());
            }
        }
    };
    let names = request(
        "$JS.API.STREAM.NAMES",
        &serde_json::json!({ "subject": subject }).to_string(),
    )?;
    let streams: Vec<String> = names["streams"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for stream in streams {
        let answer = request(&format!("$JS.API.STREAM.DELETE.{stream}"), "")?;
        if answer["success"] != serde_json::json!(true) {
            return Err(format!("deleting {stream}: {answer}"));
        }
    }
    Ok(())
}
