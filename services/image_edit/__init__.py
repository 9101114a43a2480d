"""Image editing service: FLUX.2-klein edits frame 0's background and erases the foreground."""
