//! What a file is: its content type from its first bytes (or its name),
//! the extension it is stored under, and whether it counts as media.

/// The content type of a file whose first bytes are `head`, else guessed
/// from `name`'s extension, else `application/octet-stream`.
pub fn sniff(head: &[u8], name: &str) -> String {
    let starts = |magic: &[u8]| head.starts_with(magic);
    let sniffed = if starts(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if starts(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Some("image/gif")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        Some("audio/wav")
    } else if head.len() >= 8 && &head[4..8] == b"ftyp" {
        Some("video/mp4")
    } else if starts(b"ID3") || starts(b"\xff\xfb") {
        Some("audio/mpeg")
    } else if starts(b"OggS") {
        Some("audio/ogg")
    } else if starts(b"%PDF-") {
        Some("application/pdf")
    } else {
        None
    };
    sniffed
        .map(str::to_owned)
        .unwrap_or_else(|| by_extension(name).to_owned())
}

/// The content type for a file name's extension.
pub fn by_extension(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "m4a" => "audio/mp4",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// The extension a file of `content_type` is stored with.
pub fn extension(content_type: &str) -> &'static str {
    match essence(content_type).as_str() {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        "audio/wav" | "audio/x-wav" | "audio/wave" => "wav",
        "audio/mpeg" => "mp3",
        "audio/ogg" => "ogg",
        "audio/mp4" => "m4a",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "video/quicktime" => "mov",
        "application/pdf" => "pdf",
        "text/plain" => "txt",
        "application/json" => "json",
        _ => "bin",
    }
}

/// `image/png; charset=x` -> `image/png`, lowercase.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether a file of this content type is media (image, video, audio).
pub fn is_media(content_type: &str) -> bool {
    let e = essence(content_type);
    e.starts_with("image/") || e.starts_with("video/") || e.starts_with("audio/")
}

/// Whether an output is media: by the type its output manifest states
/// (`image`, `video`, `audio`, `media`, and names such as `image_list`:
/// yes; `string`, `int`, `json` and the like: no), else (no manifest, or a
/// type nobody documented) by the content type its link answers with.
pub fn output_is_media(declared: Option<&str>, content_type: &str) -> bool {
    let declared = declared.map(|d| d.trim().to_ascii_lowercase());
    match declared.as_deref() {
        Some(d) if d == "media" || ["image", "video", "audio"].iter().any(|k| d.starts_with(k)) => {
            true
        }
        Some(
            "string" | "text" | "int" | "integer" | "float" | "number" | "bool" | "boolean"
            | "json" | "object",
        ) => false,
        _ => is_media(content_type),
    }
}

/// The media kind of a content type as providers name it: `image`,
/// `video`, `audio`, else `document`.
pub fn kind(content_type: &str) -> &'static str {
    let e = essence(content_type);
    if e.starts_with("image/") {
        "image"
    } else if e.starts_with("video/") {
        "video"
    } else if e.starts_with("audio/") {
        "audio"
    } else {
        "document"
    }
}

/// A manifest type that names a media kind (`image`, `video`, `audio`).
pub fn manifest_type_is_media(kind: &str) -> bool {
    matches!(kind, "image" | "video" | "audio" | "media")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_beats_names_and_names_beat_nothing() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n....", "x.bin"), "image/png");
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt ", "a"), "audio/wav");
        assert_eq!(sniff(b"\0\0\0\x18ftypisom", "a"), "video/mp4");
        assert_eq!(sniff(b"hello", "notes.TXT"), "text/plain");
        assert_eq!(sniff(b"hello", "noext"), "application/octet-stream");
        assert_eq!(extension("image/png; q=1"), "png");
        assert_eq!(extension("application/x-weird"), "bin");
        assert!(is_media("Video/MP4") && !is_media("text/html"));
        assert_eq!(kind("audio/wav"), "audio");
        assert_eq!(kind("application/pdf"), "document");
    }

    #[test]
    fn outputs_are_media_by_their_manifest_type_else_by_content_type() {
        for (declared, content_type, media) in [
            (Some("image"), "application/octet-stream", true),
            (Some("Video"), "text/plain", true),
            (Some("image_list"), "", true),
            (Some("string"), "image/png", false),
            (Some("int"), "video/mp4", false),
            (Some("file"), "image/png", true),
            (Some("file"), "application/pdf", false),
            (None, "audio/wav", true),
            (None, "text/html", false),
        ] {
            assert_eq!(
                output_is_media(declared, content_type),
                media,
                "{declared:?} {content_type}"
            );
        }
    }
}
