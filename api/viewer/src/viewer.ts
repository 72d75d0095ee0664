/**
 * lipsync-live viewer: joins a LiveKit room with a subscribe-only token (?url=&token=)
 * and plays the avatar's `avatar_video` and `avatar_audio` tracks.
 *
 * `window.lipsyncViewer` exposes what the page sees (state, frames decoded, how many
 * distinct frames it sampled) so a headless browser test can tell a live avatar from a
 * frozen or black one.
 */
import { Room, RoomEvent, Track, type RemoteTrack } from "livekit-client";

type ViewerState = "starting" | "connecting" | "waiting-for-avatar" | "playing" | "disconnected" | "error";

interface ViewerStats {
  state: ViewerState;
  framesDecoded: number;
  distinctFrameHashes: number;
  audioTrack: boolean;
  lastError: string;
}

declare global {
  interface Window {
    lipsyncViewer: ViewerStats;
  }
}

const SAMPLE_INTERVAL_MS = 200;
const SAMPLE_SIZE_PX = 32;

const stats: ViewerStats = {
  state: "starting",
  framesDecoded: 0,
  distinctFrameHashes: 0,
  audioTrack: false,
  lastError: "",
};
window.lipsyncViewer = stats;

const video = document.getElementById("avatar") as HTMLVideoElement;
const audio = document.getElementById("avatar-audio") as HTMLAudioElement;
const unmute = document.getElementById("unmute") as HTMLButtonElement;
const statusLine = document.getElementById("status") as HTMLDivElement;

function setState(state: ViewerState, detail = ""): void {
  stats.state = state;
  statusLine.dataset.state = state;
  statusLine.textContent = detail ? `${state}: ${detail}` : state;
}

function fail(message: string): void {
  stats.lastError = message;
  setState("error", message);
}

/** Samples the playing video into a tiny canvas and counts distinct frame hashes. */
function startFrameSampler(): void {
  const canvas = document.createElement("canvas");
  canvas.width = SAMPLE_SIZE_PX;
  canvas.height = SAMPLE_SIZE_PX;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const seen = new Set<number>();
  window.setInterval(() => {
    stats.framesDecoded = video.getVideoPlaybackQuality?.().totalVideoFrames ?? 0;
    if (!context || video.readyState < 2) return;
    context.drawImage(video, 0, 0, SAMPLE_SIZE_PX, SAMPLE_SIZE_PX);
    const pixels = context.getImageData(0, 0, SAMPLE_SIZE_PX, SAMPLE_SIZE_PX).data;
    let hash = 2166136261;
    for (let i = 0; i < pixels.length; i += 4) {
      // Quantised so encoder noise on a still image does not count as change.
      hash = Math.imul(hash ^ (pixels[i] >> 3) ^ ((pixels[i + 1] >> 3) << 5), 16777619);
    }
    seen.add(hash >>> 0);
    stats.distinctFrameHashes = seen.size;
  }, SAMPLE_INTERVAL_MS);
}

function attach(track: RemoteTrack): void {
  if (track.kind === Track.Kind.Video) {
    track.attach(video);
    setState("playing");
  } else if (track.kind === Track.Kind.Audio) {
    track.attach(audio);
    stats.audioTrack = true;
    audio.play().catch(() => {
      // Browsers block sound until the user interacts with the page.
      unmute.hidden = false;
    });
  }
}

async function main(): Promise<void> {
  const params = new URLSearchParams(window.location.search);
  const url = params.get("url");
  const token = params.get("token");
  if (!url || !token) {
    fail("this page needs ?url=<livekit ws url>&token=<viewer token> (POST /v1/livekit/token mints one)");
    return;
  }
  unmute.addEventListener("click", () => {
    audio.play().then(() => (unmute.hidden = true), (error: unknown) => fail(String(error)));
  });
  const room = new Room({ adaptiveStream: false, dynacast: false });
  room
    .on(RoomEvent.TrackSubscribed, (track) => attach(track))
    .on(RoomEvent.Disconnected, (reason) => setState("disconnected", String(reason ?? "")));
  setState("connecting", url);
  try {
    await room.connect(url, token, { autoSubscribe: true });
  } catch (error) {
    fail(`could not join the room: ${String(error)}`);
    return;
  }
  if (stats.state === "connecting") setState("waiting-for-avatar", room.name);
  startFrameSampler();
}

void main();
