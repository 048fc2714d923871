//! Output files, served for real at the links run answers carry
//! (`GET /media/{run_order_id}/{key}.{ext}`, no key needed, like a
//! presigned URL): a small generated PNG, WAV or MP4 by extension. A link
//! expires `media_ttl_ms` after its run ended (HTTP 403, as an expired
//! presigned URL answers); `fail_next_downloads` and `media_size_bytes`
//! make the other failures a mirror must survive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::Value;

use super::state::Shared;

/// The host the catalogue's output links are written with; answers carry
/// the simulator's own address instead, so the links work.
pub(crate) const PLACEHOLDER: &str = "https://sim.chenyu.local/media/";

/// How long links stay valid when `media_ttl_ms` is not set.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Chunk size of a large (`media_size_bytes`) answer.
const CHUNK: usize = 64 * 1024;

pub(crate) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/media/{run_order_id}/{file}", get(download))
        .with_state(shared)
}

/// Points the output links in `data["outputs"]` at the host the request
/// came to (`Host`), where [`routes`] serves them.
pub(crate) fn link_outputs(data: &mut Value, headers: &HeaderMap) {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return;
    };
    let Some(Value::Object(outputs)) = data.get_mut("outputs") else {
        return;
    };
    for value in outputs.values_mut() {
        if let Value::String(url) = value
            && let Some(rest) = url.strip_prefix(PLACEHOLDER)
        {
            *url = format!("http://{host}/media/{rest}");
        }
    }
}

enum Verdict {
    Unavailable,
    NotFound,
    Expired,
    Serve { seq: u64, size: Option<u64> },
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((run_order_id, file)): Path<(String, String)>,
) -> Response {
    let now = Instant::now();
    let announced = shared.lock().faults.media_content_type.clone();
    let verdict = {
        let mut inner = shared.lock();
        inner.stats.media_requests += 1;
        if inner.faults.take_download_fault() {
            Verdict::Unavailable
        } else {
            let ttl = inner
                .faults
                .media_ttl_ms
                .map_or(DEFAULT_TTL, Duration::from_millis);
            let size = inner.faults.media_size_bytes;
            match inner.runs.get(&run_order_id) {
                None => Verdict::NotFound,
                Some(run) => {
                    let ended = run.submitted + shared.timing.queue + shared.timing.run;
                    if now < ended {
                        Verdict::NotFound
                    } else if now > ended + ttl {
                        inner.stats.media_expired += 1;
                        Verdict::Expired
                    } else {
                        Verdict::Serve { seq: run.seq, size }
                    }
                }
            }
        }
    };
    let ext = file.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    let content_type =
        announced.unwrap_or_else(|| crate::files::media::by_extension(&file).to_owned());
    match verdict {
        Verdict::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service unavailable (injected)").into_response(),
        Verdict::NotFound => (StatusCode::NOT_FOUND, "NoSuchKey").into_response(),
        Verdict::Expired => (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "application/xml")],
            "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
            .into_response(),
        Verdict::Serve { size: Some(size), .. } => {
            let shared = shared.clone();
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let shared = shared.clone();
                async move {
                    if sent >= size {
                        return None;
                    }
                    let n = (size - sent).min(CHUNK as u64);
                    shared.lock().stats.media_bytes_sent += n;
                    let chunk = Bytes::from(vec![0x5au8; n as usize]);
                    Some((Ok::<_, std::io::Error>(chunk), sent + n))
                }
            });
            (
                [(header::CONTENT_TYPE, content_type)],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Verdict::Serve { seq, size: None } => {
            let body = match ext {
                "png" => png(seq),
                "wav" => wav(seq),
                "mp4" => mp4(seq),
                _ => format!("simulated output of run {run_order_id}\n").into_bytes(),
            };
            shared.lock().stats.media_bytes_sent += body.len() as u64;
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
    }
}

/// CRC-32 (IEEE), bit by bit: the files are small.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
    }
    !crc
}

/// A 32x32 RGB PNG whose colours depend on `seed` (stored deflate blocks).
pub(crate) fn png(seed: u64) -> Vec<u8> {
    const SIDE: u32 = 32;
    let [r0, g0, b0, ..] = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
    let mut raw = Vec::new();
    for y in 0..SIDE {
        raw.push(0); // filter: none
        for x in 0..SIDE {
            raw.extend([
                r0.wrapping_add((x * 8) as u8),
                g0.wrapping_add((y * 8) as u8),
                b0.wrapping_add(((x + y) * 4) as u8),
            ]);
        }
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend(len.to_le_bytes());
        zlib.extend((!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend(((b << 16) | a).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend(SIDE.to_be_bytes());
    ihdr.extend(SIDE.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", ihdr.as_slice()), (b"IDAT", &zlib), (b"IEND", &[])] {
        out.extend((data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend(crc32(&[kind, data]).to_be_bytes());
    }
    out
}

/// A quarter second of a sine tone (8 kHz, 16-bit mono WAV).
pub(crate) fn wav(seed: u64) -> Vec<u8> {
    let rate = 8000u32;
    let samples = rate / 4;
    let pitch = 220.0 + (seed % 8) as f64 * 55.0;
    let data_len = samples * 2;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend((36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend(16u32.to_le_bytes());
    out.extend(1u16.to_le_bytes()); // PCM
    out.extend(1u16.to_le_bytes()); // mono
    out.extend(rate.to_le_bytes());
    out.extend((rate * 2).to_le_bytes());
    out.extend(2u16.to_le_bytes());
    out.extend(16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend(data_len.to_le_bytes());
    for i in 0..samples {
        let t = f64::from(i) / f64::from(rate);
        let v = (t * pitch * std::f64::consts::TAU).sin() * 8000.0;
        out.extend((v as i16).to_le_bytes());
    }
    out
}

/// A tiny ISO base media file: `ftyp`, `free` and a small `mdat`.
pub(crate) fn mp4(seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(24u32.to_be_bytes());
    out.extend_from_slice(b"ftypisom");
    out.extend(0x200u32.to_be_bytes());
    out.extend_from_slice(b"isommp41");
    out.extend(8u32.to_be_bytes());
    out.extend_from_slice(b"free");
    let payload = seed.to_be_bytes().repeat(16);
    out.extend((8 + payload.len() as u32).to_be_bytes());
    out.extend_from_slice(b"mdat");
    out.extend(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_look_like_what_they_claim() {
        let png = png(3);
        assert_eq!(crate::files::media::sniff(&png, "x"), "image/png");
        // IEND's CRC is a known constant.
        assert_eq!(&png[png.len() - 4..], &[0xae, 0x42, 0x60, 0x82]);
        assert_eq!(crate::files::media::sniff(&wav(1), "x"), "audio/wav");
        assert_eq!(crate::files::media::sniff(&mp4(1), "x"), "video/mp4");
        assert_ne!(png, super::png(4));
    }
}
