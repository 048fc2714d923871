//! Terminal views: `wfq top` (live counts) and `wfq enqueue --wait` (one
//! run followed to its end). Rendering is pure (data in, lines out, unit
//! tested); the loops around it read the database and redraw with plain
//! ANSI sequences when the output is a terminal, or print plain lines when
//! it is not (a pipe, a log file, a test).

pub mod pauses;
pub mod top;
pub mod wait;

use std::time::Duration;

/// Moves the cursor to the top left corner.
pub const CURSOR_HOME: &str = "\x1b[H";
/// Clears the whole screen.
pub const CLEAR_SCREEN: &str = "\x1b[2J";
/// Clears from the cursor to the end of the line.
pub const CLEAR_LINE_END: &str = "\x1b[K";
/// Clears from the cursor to the end of the screen.
pub const CLEAR_SCREEN_END: &str = "\x1b[J";

/// A short duration for people: `0.4s`, `12.0s`, `3m05s`, `2h04m`.
pub fn format_elapsed(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well_at_every_scale() {
        assert_eq!(format_elapsed(Duration::from_millis(400)), "0.4s");
        assert_eq!(format_elapsed(Duration::from_millis(59_940)), "59.9s");
        assert_eq!(format_elapsed(Duration::from_secs(185)), "3m05s");
        assert_eq!(format_elapsed(Duration::from_secs(7440)), "2h04m");
    }
}
