"""Avatar preparation: decode frames (zip/video/image), find the face, MuseTalk crops, blend mask, cache."""
