"""Control synthesis service: Wan2.2-Fun-A14B-Control renders the edited video from the decoupled Canny video."""
