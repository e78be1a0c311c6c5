"""SFI itself, per row: the boundary detector (when a row takes a slow step), the Selector (what its memory
keeps), the compact memory, the in-step refresh of a static decode step, and the runtime that plans each row's
steps and reports what they cost."""
