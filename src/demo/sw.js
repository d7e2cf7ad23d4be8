// Service worker of the Herald demo.
//
// Each push is reported to the demo server before the notification is
// shown: headless browsers may reject showNotification(), and the report is
// what tests and the page rely on.

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  event.waitUntil(handlePush(event));
});

// Which subscription a push came to, so the page lists only its own
// browser's messages. Bounded: a slow getSubscription() must not hold the
// push event (the message is reported unscoped then).
async function ownEndpoint() {
  try {
    const sub = await Promise.race([
      self.registration.pushManager.getSubscription(),
      new Promise((resolve) => setTimeout(() => resolve(null), 3000)),
    ]);
    return sub ? sub.endpoint : null;
  } catch (e) {
    return null;
  }
}

async function handlePush(event) {
  let text = null;
  if (event.data) {
    try {
      text = event.data.text();
    } catch (e) {
      text = '(undecodable payload: ' + e + ')';
    }
  }
  try {
    await fetch('/received', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ text, endpoint: await ownEndpoint() }),
    });
  } catch (e) {
    // The demo server being down must not turn the push into a nack.
  }
  const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
  for (const client of windows) {
    client.postMessage({ type: 'push', text });
  }
  try {
    await self.registration.showNotification('Herald demo', {
      body: text === null ? '(no payload)' : text,
      tag: 'herald-demo',
    });
  } catch (e) {
    // Rejected in headless mode; the message was already reported above.
  }
}

// The push service replaced or dropped our subscription: hand the new one to
// the application server so it keeps reaching us.
self.addEventListener('pushsubscriptionchange', (event) => {
  event.waitUntil((async () => {
    let sub = event.newSubscription;
    if (!sub && event.oldSubscription) {
      sub = await self.registration.pushManager.subscribe(event.oldSubscription.options);
    }
    if (event.oldSubscription) {
      await fetch('/unsubscribe', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ endpoint: event.oldSubscription.endpoint }),
      });
    }
    if (sub) {
      await fetch('/subscribe', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(sub.toJSON()),
      });
    }
  })());
});
