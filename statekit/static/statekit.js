/*
 * statekit.js — keeps browser-state tokens in localStorage and the server in step.
 *
 * The server never sends a secret: only opaque tokens, one per storage key. This
 * helper sends the stored tokens with each request (header X-Statekit-Browser, a JSON
 * object {storageKey: token}) and stores the tokens the server returns (header
 * X-Statekit-Browser-Set, same shape; null removes a key). No build step, no
 * dependency; works in every browser with fetch and localStorage.
 *
 *   <script src="/statekit.js"></script>
 *   <script>
 *     const state = StateKit.create({ keys: ["login"] });
 *     const response = await state.fetch("/api/load", { method: "POST" });
 *   </script>
 */
(function (global) {
  "use strict";

  var SEND = "X-Statekit-Browser";
  var RECEIVE = "X-Statekit-Browser-Set";
  var PREFIX = "statekit:";

  function create(options) {
    var keys = (options && options.keys) || [];
    var storage = (options && options.storage) || global.localStorage;

    /* The tokens of the managed keys, as stored: {storageKey: token}. */
    function tokens() {
      var out = {};
      keys.forEach(function (key) {
        var token = storage.getItem(PREFIX + key);
        if (token) out[key] = token;
      });
      return out;
    }

    /* Store the tokens of a response's X-Statekit-Browser-Set header, if any. */
    function absorb(response) {
      var header = response.headers.get(RECEIVE);
      if (!header) return;
      var update;
      try {
        update = JSON.parse(header);
      } catch (error) {
        return; /* not ours: leave the stored tokens alone */
      }
      Object.keys(update).forEach(function (key) {
        if (keys.indexOf(key) < 0) return;
        if (update[key] === null) storage.removeItem(PREFIX + key);
        else storage.setItem(PREFIX + key, String(update[key]));
      });
    }

    /* fetch() that sends the stored tokens and keeps the returned ones. */
    function send(url, init) {
      init = init || {};
      var headers = new Headers(init.headers || {});
      headers.set(SEND, JSON.stringify(tokens()));
      init.headers = headers;
      init.credentials = init.credentials || "same-origin";
      return global.fetch(url, init).then(function (response) {
        absorb(response);
        return response;
      });
    }

    return { tokens: tokens, absorb: absorb, fetch: send, keys: keys.slice() };
  }

  global.StateKit = { create: create, SEND: SEND, RECEIVE: RECEIVE, PREFIX: PREFIX };
})(typeof window !== "undefined" ? window : this);
