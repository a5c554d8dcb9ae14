//! keysync-agent (work in progress).
