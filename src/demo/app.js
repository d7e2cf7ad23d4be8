// Page logic of the Herald demo: walk the Push API steps, show each one's
// outcome, send messages through the demo server and list what arrived.
//
// Load the page with ?action=unsubscribe to unsubscribe instead of
// subscribing (how tests drive the unsubscribe path without a click).
'use strict';

const SUBSCRIBE_ATTEMPTS = 10;
// A fresh Firefox profile's first subscribe() can hang while its push
// service starts; a second call a few seconds later succeeds.
const SUBSCRIBE_ATTEMPT_MS = 5000;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Mirror progress to the demo server's log: with a headless browser that is
// the only place a person can see it.
function log(message) {
  fetch('/log', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ message }),
  }).catch(() => {});
}

function step(id, state, detail) {
  const li = document.getElementById('step-' + id);
  li.dataset.state = state;
  li.querySelector('.detail').textContent = detail || '';
  log(`step ${id}: ${state}${detail ? ' - ' + detail : ''}`);
}

function b64urlToBytes(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/').replace(/=+$/, '');
  const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

function sameBytes(buffer, bytes) {
  if (!buffer) return false;
  const a = new Uint8Array(buffer);
  return a.length === bytes.length && a.every((v, i) => v === bytes[i]);
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((json && json.error) || `${path} answered ${response.status}`);
  }
  return json;
}

let registration = null;
// This browser's subscription: the received list and the Send button are
// about it alone, not every browser that ever opened the page.
let myEndpoint = null;
// The demo server's /config, for advice when subscribing fails.
let config = null;

async function registerWorker() {
  step('support', 'running');
  if (!('serviceWorker' in navigator) || !('PushManager' in window)) {
    step('support', 'fail', 'this browser (or this non-secure origin) has no service workers or Push API');
    throw new Error('unsupported');
  }
  step('support', 'ok', 'navigator.serviceWorker and PushManager are available');

  step('register', 'running');
  try {
    await navigator.serviceWorker.register('/sw.js');
    registration = await withTimeout(navigator.serviceWorker.ready, 15000, 'service worker activation');
    step('register', 'ok', 'scope ' + registration.scope);
  } catch (e) {
    step('register', 'fail', String(e));
    throw e;
  }
}

async function askPermission() {
  step('permission', 'running');
  try {
    const result = await withTimeout(Notification.requestPermission(), 10000, 'permission request');
    step('permission', result === 'granted' ? 'ok' : 'fail', result);
  } catch (e) {
    // Subscribing may still work (browsers configured to ignore the
    // permission), so report and carry on.
    step('permission', 'fail', String(e));
  }
}

async function serverKey() {
  step('key', 'running');
  const response = await fetch('/vapid-public-key');
  if (!response.ok) {
    step('key', 'fail', `/vapid-public-key answered ${response.status}`);
    throw new Error('no key');
  }
  const key = (await response.text()).trim();
  step('key', 'ok', key);
  return b64urlToBytes(key);
}

async function currentSubscription() {
  return withTimeout(registration.pushManager.getSubscription(), SUBSCRIBE_ATTEMPT_MS, 'getSubscription()');
}

async function subscribe() {
  const key = await serverKey();
  step('subscribe', 'running');
  let subscription = null;
  let lastError = null;
  for (let attempt = 1; attempt <= SUBSCRIBE_ATTEMPTS && !subscription; attempt++) {
    try {
      const existing = await currentSubscription();
      if (existing && sameBytes(existing.options.applicationServerKey, key)) {
        subscription = existing;
        step('subscribe', 'ok', 'reusing the existing subscription');
        break;
      }
      if (existing) {
        // Made with another application server key (the demo's state was
        // reset): a push service would refuse our VAPID signature for it.
        await existing.unsubscribe();
      }
      subscription = await withTimeout(
        registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }),
        SUBSCRIBE_ATTEMPT_MS,
        'subscribe()',
      );
      step('subscribe', 'ok', `subscribed on attempt ${attempt}`);
    } catch (e) {
      lastError = e;
      step('subscribe', 'running', `attempt ${attempt} failed (${e}); retrying`);
      await sleep(1000);
    }
  }
  if (!subscription) {
    step('subscribe', 'fail', subscribeAdvice(lastError));
    throw new Error('subscribe failed');
  }
  myEndpoint = subscription.endpoint;
  document.getElementById('endpoint').textContent = subscription.endpoint;
  refreshReceived();

  step('store', 'running');
  try {
    await postJson('/subscribe', subscription.toJSON());
    step('store', 'ok', 'the demo server will send to ' + subscription.endpoint);
  } catch (e) {
    step('store', 'fail', String(e));
    throw e;
  }
}

// What to check when the browser gives no subscription: it talks to the push
// service named in its own preferences, which this page cannot read.
function subscribeAdvice(error) {
  const ws = (config && config.websocketUrl) || 'ws://127.0.0.1:8080/';
  const push = (config && config.pushUrl) || 'Herald';
  return `no subscription after ${SUBSCRIBE_ATTEMPTS} attempts; the browser said: ${error}. ` +
    `Check in about:config: dom.push.serverURL must be ${ws} (then restart the browser); ` +
    `for a ws:// address dom.push.testing.allowInsecureServerURL must be true; ` +
    `and Herald must be running and reachable at that address (${push}).`;
}

async function unsubscribe() {
  step('subscribe', 'running', 'unsubscribing');
  // The endpoint being removed, kept across attempts: an unsubscribe() that
  // timed out may still complete, and the next attempt then finds nothing.
  let endpoint = null;
  for (let attempt = 1; attempt <= SUBSCRIBE_ATTEMPTS; attempt++) {
    try {
      const existing = await currentSubscription();
      if (existing) {
        endpoint = existing.endpoint;
        const ok = await withTimeout(existing.unsubscribe(), SUBSCRIBE_ATTEMPT_MS, 'unsubscribe()');
        if (!ok) throw new Error('unsubscribe() returned false');
      }
      myEndpoint = null;
      document.getElementById('endpoint').textContent = 'none (unsubscribed)';
      step('subscribe', 'ok', endpoint ? 'unsubscribed' : 'there was no subscription');
      await postJson('/unsubscribe', { endpoint });
      step('store', 'ok', 'the demo server forgot the subscription');
      return;
    } catch (e) {
      step('subscribe', 'running', `unsubscribe attempt ${attempt} failed (${e}); retrying`);
      await sleep(1000);
    }
  }
  step('subscribe', 'fail', `still subscribed after ${SUBSCRIBE_ATTEMPTS} attempts`);
}

async function refreshReceived() {
  const body = document.getElementById('received');
  const note = (text) => {
    body.replaceChildren();
    const cell = body.insertRow().insertCell();
    cell.colSpan = 3;
    cell.className = 'muted';
    cell.textContent = text;
  };
  if (!myEndpoint) {
    note('not subscribed yet');
    return;
  }
  try {
    const response = await fetch('/received?endpoint=' + encodeURIComponent(myEndpoint));
    const messages = await response.json();
    if (messages.length === 0) {
      note('nothing yet');
      return;
    }
    body.replaceChildren();
    for (const m of messages.slice().reverse()) {
      const row = body.insertRow();
      row.insertCell().textContent = m.seq;
      row.insertCell().textContent = m.text === null ? '(no payload)' : m.text;
      row.insertCell().textContent = new Date(m.receivedAtMs).toLocaleTimeString();
    }
  } catch (e) {
    // The demo server is restarting; the next poll will catch up.
  }
}

async function sendForm(event) {
  event.preventDefault();
  const out = document.getElementById('send-result');
  const ttl = document.getElementById('ttl').value;
  const body = {
    text: document.getElementById('text').value,
    ttl: ttl === '' ? null : Number(ttl),
    urgency: document.getElementById('urgency').value || null,
    topic: document.getElementById('topic').value || null,
    endpoint: myEndpoint,
  };
  if (!myEndpoint) {
    out.textContent = 'this browser has no subscription yet: nothing to send to';
    return;
  }
  out.textContent = 'sending…';
  try {
    const result = await postJson('/send', body);
    if (result.results.length === 0) {
      out.textContent = 'the demo server no longer has this subscription; press "Subscribe again"';
      return;
    }
    out.textContent = result.results
      .map((r) => `${r.status}${r.errno ? ' errno ' + r.errno : ''}${r.message ? ' ' + r.message : ''}` +
        `${r.forgotten ? ' (subscription forgotten)' : ''} → ${r.endpoint}`)
      .join('; ');
  } catch (e) {
    out.textContent = 'failed: ' + e.message;
  }
}

async function showConfig() {
  try {
    config = await (await fetch('/config')).json();
    document.getElementById('ws-url').textContent = config.websocketUrl;
  } catch (e) { /* informational only */ }
}

async function main() {
  document.getElementById('send-form').addEventListener('submit', sendForm);
  document.getElementById('unsubscribe').addEventListener('click', () => unsubscribe());
  document.getElementById('resubscribe').addEventListener('click', () => subscribe().catch(() => {}));
  showConfig();
  refreshReceived();
  setInterval(refreshReceived, 2000);

  await registerWorker();
  navigator.serviceWorker.addEventListener('message', (event) => {
    if (event.data && event.data.type === 'push') refreshReceived();
  });
  await askPermission();
  const action = new URLSearchParams(location.search).get('action');
  if (action === 'unsubscribe') {
    await unsubscribe();
  } else {
    await subscribe();
  }
}

// For use from the console or an automation tool.
window.heraldDemo = { subscribe, unsubscribe };

main().catch((e) => log('stopped: ' + e));
