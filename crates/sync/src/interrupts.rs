//! When a newer checkpoint may interrupt a long download (protocol spec §7.3).

/// Ops sent for a checkpoint before a newer one may interrupt its download (the reference's
/// rule); see [`Interrupts`].
const INTERRUPT_AFTER_OPS: usize = 1000;
/// Interruptions in a row after which a download finishes whatever arrives meanwhile.
const MAX_INTERRUPTIONS: u32 = 8;

/// When a newer checkpoint may interrupt a download (protocol spec §7.3 "Interruption").
///
/// As in the reference, only after enough ops were sent for the current checkpoint, so every
/// interruption makes progress. On top of that, each interruption in a row needs twice the ops
/// of the one before, and after [`MAX_INTERRUPTIONS`] the download finishes whatever arrives:
/// a client whose buckets change nearly as fast as it downloads still reaches a
/// `checkpoint_complete` (with a fixed threshold it would only if they changed slower).
#[derive(Default)]
pub struct Interrupts {
    /// Ops sent since the last checkpoint line.
    pub sent: usize,
    /// Interruptions since the last `checkpoint_complete`.
    in_a_row: u32,
}

impl Interrupts {
    pub fn due(&self) -> bool {
        self.in_a_row < MAX_INTERRUPTIONS && self.sent >= INTERRUPT_AFTER_OPS << self.in_a_row
    }

    pub fn interrupted(&mut self) {
        self.in_a_row += 1;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_interruption_in_a_row_needs_twice_the_ops_until_none_is_allowed() {
        let mut interrupts = Interrupts {
            sent: INTERRUPT_AFTER_OPS - 1,
            in_a_row: 0,
        };
        assert!(!interrupts.due());
        interrupts.sent += 1;
        assert!(interrupts.due());
        interrupts.interrupted();
        interrupts.sent = INTERRUPT_AFTER_OPS;
        assert!(!interrupts.due());
        interrupts.sent = 2 * INTERRUPT_AFTER_OPS;
        assert!(interrupts.due());
        for _ in 1..MAX_INTERRUPTIONS {
            interrupts.interrupted();
        }
        interrupts.sent = usize::MAX;
        assert!(!interrupts.due(), "after {MAX_INTERRUPTIONS} in a row the download finishes");
    }
}
