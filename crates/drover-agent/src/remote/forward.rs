//! Port forwarding: each OPEN is one TCP connection from the device to a target that
//! `[remote] forward_allow` permits, carried as its own stream with its own credit.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::remote::{FrameType, MAX_STREAMS, Reason, ResetBody, Target};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::stream::{Pump, PumpEnd};
use super::{Link, Shared};
use crate::config::RemoteConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn reset(link: &Link, id: u16, reason: Reason, message: String) {
    tracing::info!(stream = id, %reason, message, "remote access: forward stream refused");
    let body = ResetBody { reason, message: Some(drover_proto::remote::clip(message)) };
    link.send_json(FrameType::Reset, id, &body).await;
}

/// Handles an OPEN: checks the target, then connects and pumps in a task of `tasks`.
pub(crate) async fn open(sh: &Shared, tasks: &mut JoinSet<()>, cfg: &Arc<RemoteConfig>, id: u16, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload).into_owned();
    let target = match Target::parse(&text) {
        Ok(t) => t,
        Err(m) => return reset(&sh.link, id, Reason::BadRequest, m).await,
    };
    if !target.allowed_by(&cfg.forward_allow) {
        return reset(&sh.link, id, Reason::TargetNotAllowed, format!("{text} is not in [remote] forward_allow")).await;
    }
    let addr = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let refused = {
        let streams = sh.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams.contains_key(&id) {
            Some((Reason::BadRequest, format!("stream {id} is already open")))
        } else if streams.len() >= MAX_STREAMS {
            Some((Reason::Busy, format!("{MAX_STREAMS} streams open")))
        } else {
            None
        }
    };
    if let Some((reason, m)) = refused {
        return reset(&sh.link, id, reason, m).await;
    }
    let mut rx = sh.add_stream(id);
    let (link, streams) = (sh.link.clone(), sh.streams.clone());
    tasks.spawn(async move {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                link.send(FrameType::Accept, id, 0, &[]).await;
                let (mut r, mut w) = s.into_split();
                let pump = Pump { link: &link, id, read_end_finishes: false };
                if let PumpEnd::Failed((reason, m)) = pump.run(&mut rx, &mut r, &mut w, &mut |_| {}).await {
                    tracing::debug!(stream = id, %reason, m, "remote access: forward stream failed");
                }
            }
            Ok(Err(e)) => reset(&link, id, Reason::ConnectFailed, format!("{addr}: {e}")).await,
            Err(_) => reset(&link, id, Reason::ConnectFailed, format!("{addr}: no answer within 10 s")).await,
        }
        streams.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    });
}
