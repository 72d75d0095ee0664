// Opens the viewer page in headless Chromium and reports what it saw, as JSON on stdout.
// Usage: node check.mjs <page-url> <screenshot.png> [wait-seconds]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, screenshotPath, waitSeconds = "20"] = process.argv.slice(2);
const userDataDir = mkdtempSync(join(tmpdir(), "viewer-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    // No background traffic: this machine allows loopback only.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
  ],
});
let result = { ok: false };
try {
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (message) => consoleLines.push(message.text()));
  await page.goto(pageUrl);
  const deadline = Date.now() + Number(waitSeconds) * 1000;
  let stats = null;
  while (Date.now() < deadline) {
    stats = await page.evaluate(() => window.lipsyncViewer);
    if (stats && stats.state === "playing" && stats.distinctFrameHashes >= 5 && stats.framesDecoded >= 25) break;
    if (stats && stats.state === "error") break;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  await page.screenshot({ path: screenshotPath });
  result = { ok: true, stats, console: consoleLines.slice(-20) };
} catch (error) {
  result = { ok: false, error: String(error) };
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(result) + "\n");
