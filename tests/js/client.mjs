// matrix-js-sdk as a Matrix client uses it, against a homeserver behind palpo_gate.
//
//   node client.mjs BASE_URL USER PASSWORD
//
// Logs in (twice: a syncing device and a sending one), creates a room, sends
// a message before and one during the sync loop, sees both through /sync,
// uploads a file and downloads it back through authenticated media.
// The last line on stdout is "RESULT {json}"; any failure exits non-zero.
// Run by tests/test_clients.py (TLS trust through NODE_EXTRA_CA_CERTS).

import { createHash, randomBytes, webcrypto } from "node:crypto";

// Node.js 18 (Debian 12's) has WebCrypto under node:crypto only; the SDK uses
// the global, so it is set before the SDK is loaded.
globalThis.crypto ??= webcrypto;
const { ClientEvent, createClient, RoomEvent } = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");

const [baseUrl, user, password] = process.argv.slice(2);
if (!password) {
    console.error("usage: node client.mjs BASE_URL USER PASSWORD");
    process.exit(2);
}
logger.setLevel("warn");
const deadline = setTimeout(() => {
    console.error("timed out");
    process.exit(3);
}, 90_000);

function step(name) {
    console.error(`[js] ${name}`);
}

async function login(device) {
    const anon = createClient({ baseUrl });
    const res = await anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user },
        password,
        initial_device_display_name: device,
    });
    return createClient({
        baseUrl,
        accessToken: res.access_token,
        userId: res.user_id,
        deviceId: res.device_id,
    });
}

function sha256(bytes) {
    return createHash("sha256").update(bytes).digest("hex");
}

step("login");
const syncer = await login("js-sync");
const sender = await login("js-send");

step("create room, send before sync");
const { room_id: roomId } = await sender.createRoom({ name: "js-sdk through the gate" });
const before = await sender.sendTextMessage(roomId, "before sync from matrix-js-sdk");

step("start sync");
const prepared = new Promise((resolve, reject) => {
    syncer.on(ClientEvent.Sync, (state, _prev, data) => {
        if (state === "PREPARED") resolve();
        if (state === "ERROR") reject(data?.error ?? new Error("sync error"));
    });
});
const seen = new Map();
let notify = () => {};
syncer.on(RoomEvent.Timeline, (event, room) => {
    if (room?.roomId === roomId && event.getType() === "m.room.message") {
        seen.set(event.getId(), event.getContent().body);
        notify();
    }
});
function waitFor(eventId) {
    return new Promise((resolve) => {
        notify = () => seen.has(eventId) && resolve(seen.get(eventId));
        notify();
    });
}
await syncer.startClient({ initialSyncLimit: 10 });
await prepared;
const beforeBody = await waitFor(before.event_id);

step("send during sync");
const during = await sender.sendTextMessage(roomId, "during sync from matrix-js-sdk");
const duringBody = await waitFor(during.event_id);

step("upload");
const payload = randomBytes(3 * 1024 * 1024 + 17);
const upload = await sender.uploadContent(payload, {
    name: "js upload.bin",
    type: "application/octet-stream",
});
const file = await sender.sendMessage(roomId, {
    msgtype: "m.file",
    body: "js upload.bin",
    url: upload.content_uri,
});
await waitFor(file.event_id);

step("download");
const url = syncer.mxcUrlToHttp(upload.content_uri, undefined, undefined, undefined,
    false, true, true);
const resp = await fetch(url, {
    headers: { Authorization: `Bearer ${syncer.getAccessToken()}` },
});
const got = Buffer.from(await resp.arrayBuffer());

syncer.stopClient();
sender.stopClient();
clearTimeout(deadline);
console.log("RESULT " + JSON.stringify({
    user_id: syncer.getUserId(),
    room_id: roomId,
    before: { event_id: before.event_id, seen_body: beforeBody },
    during: { event_id: during.event_id, seen_body: duringBody },
    content_uri: upload.content_uri,
    download_url: url,
    download_status: resp.status,
    sent_sha256: sha256(payload),
    got_sha256: sha256(got),
    size: payload.length,
}));
process.exit(0);
