//! The read path: a recovery host (or the VM's own host) fetches sealed chunks of a recovery
//! point. The gateway checks, before sending anything, that every requested chunk belongs to
//! a point storage-writer says the host may read, then streams the chunks from the store in
//! request order with a few reads ahead. It never writes on this path.

use std::collections::VecDeque;

use bytes::Bytes;
use ferry_mesh::Identity;
use ferry_store::StoreError;
use quinn::{RecvStream, SendStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use super::{Conn, Gateway, OFFER_TIMEOUT, PAYLOAD_TIMEOUT, StreamError, StreamState, kib, timed};
use crate::fetch::{self, FetchFrame};
use crate::frame::{self, ChunkId, ErrorCode};
use crate::storage::{EntitlementError, short_hex};

/// Store reads in flight per FETCH, ahead of the chunk being written.
const READS_AHEAD: usize = 8;

/// Logs a refused or failed FETCH at warn, with what it asked for.
pub(super) fn log_refusal(ctx: &Conn, st: &StreamState, code: ErrorCode, e: &StreamError) {
    let (vm, point) = st
        .fetch
        .as_ref()
        .map(|(v, p)| (v.as_str(), p.as_str()))
        .unwrap_or(("-", "-"));
    let host = match &ctx.identity {
        Identity::Host(h) => h.as_str(),
        _ => "-",
    };
    let what = if st.data_sent {
        "fetch failed"
    } else {
        "fetch refused"
    };
    warn!(peer = %ctx.peer, identity = %ctx.identity, host = %host, vm = %vm, point = %point, code = ?code, error = %e, "{what}");
}

pub(super) async fn serve_fetch(
    ctx: &Conn,
    send: &mut SendStream,
    recv: &mut RecvStream,
    st: &mut StreamState,
) -> Result<(), StreamError> {
    let read = fetch::read_fetch_body(recv);
    let req = timed(OFFER_TIMEOUT, "sending the fetch request", read).await?;
    st.fetch = Some((req.vm.clone(), req.point.clone()));
    let end = fetch::expect_fetch_end(recv);
    timed(OFFER_TIMEOUT, "finishing the fetch request", end).await?;
    let Identity::Host(host) = &ctx.identity else {
        return Err(StreamError::NotHost(ctx.identity.clone()));
    };
    let storage = &ctx.gw.storage;
    let checked = ctx
        .entitled
        .check(storage, host, &req.vm, &req.point, &req.ids)
        .await;
    checked.map_err(|e| match e {
        EntitlementError::Denied(reason) => StreamError::ReadDenied {
            vm: req.vm.clone(),
            point: req.point.clone(),
            reason,
        },
        e @ EntitlementError::NotEntitled { .. } => StreamError::NotEntitled(e.to_string()),
        EntitlementError::Storage(e) => StreamError::Storage(e),
    })?;
    let bytes = send_chunks(&ctx.gw, send, &req, st).await?;
    send.finish()?;
    debug!(
        peer = %ctx.peer,
        host = %host,
        vm = %req.vm,
        point = %req.point,
        chunks = req.ids.len(),
        bytes,
        "fetch served"
    );
    Ok(())
}

/// A store read running ahead, holding the memory its chunk may take until it is written.
type Read = AbortOnDropHandle<(Result<Bytes, StoreError>, OwnedSemaphorePermit)>;

/// Streams the requested chunks in request order: FRD1 once the first chunk is read (so a
/// chunk missing at the start is an ERROR frame), then each chunk while the next ones are
/// read. Returns the sealed bytes sent.
async fn send_chunks(
    gw: &Gateway,
    send: &mut SendStream,
    req: &FetchFrame,
    st: &mut StreamState,
) -> Result<u64, StreamError> {
    let max_sealed = frame::max_sealed_len(gw.max_block);
    let mut ahead: VecDeque<(ChunkId, Read)> = VecDeque::with_capacity(READS_AHEAD);
    let mut next = 0;
    let mut bytes = 0u64;
    loop {
        while ahead.len() < READS_AHEAD && next < req.ids.len() {
            // A chunk's size is known only once read: reserve the most it may be. Only a
            // stream holding nothing waits for memory; one that holds reads stops reading
            // ahead instead, so streams never wait on each other's reservations.
            let want = kib(max_sealed);
            let permit = if ahead.is_empty() {
                let permit = gw.memory.clone().acquire_many_owned(want).await;
                permit.map_err(|e| StreamError::Task(e.to_string()))?
            } else {
                match gw.memory.clone().try_acquire_many_owned(want) {
                    Ok(permit) => permit,
                    Err(_) => break,
                }
            };
            let (store, id) = (gw.store.clone(), req.ids[next]);
            let read = tokio::spawn(async move { (store.get_chunk(&id).await, permit) });
            ahead.push_back((id, AbortOnDropHandle::new(read)));
            next += 1;
        }
        let Some((id, read)) = ahead.pop_front() else {
            return Ok(bytes);
        };
        let (sealed, _permit) = read.await.map_err(|e| StreamError::Task(e.to_string()))?;
        let sealed = sealed.map_err(|e| match e {
            StoreError::NotFound { .. } => StreamError::MissingChunk {
                chunk: short_hex(&id),
                vm: req.vm.clone(),
                point: req.point.clone(),
            },
            other => StreamError::Store(other),
        })?;
        // The client refuses what the protocol does not allow; say why here instead.
        if sealed.is_empty() || sealed.len() > max_sealed as usize {
            return Err(StreamError::OversizedChunk {
                chunk: short_hex(&id),
                len: sealed.len(),
            });
        }
        bytes += sealed.len() as u64;
        let [len, sealed, hash] = fetch::encode_chunk(sealed);
        let mut parts = if st.data_sent {
            vec![len, sealed, hash]
        } else {
            st.data_sent = true;
            vec![Bytes::from_static(&fetch::MAGIC_DATA), len, sealed, hash]
        };
        let write = send.write_all_chunks(&mut parts);
        match tokio::time::timeout(PAYLOAD_TIMEOUT, write).await {
            Ok(written) => written?,
            Err(_) => return Err(StreamError::Timeout("reading the fetched chunks")),
        }
    }
}
