// Live updates: server-sent events replace table rows, a job's live part and the alarm banner
// in place. The pages work without this script (forms and links); it only spares the reloads.
(function () {
  "use strict";
  var url = document.body.getAttribute("data-events");
  if (!url || !window.EventSource) return;
  var csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";

  function fragment(html, tag) {
    var holder = document.createElement(tag);
    holder.innerHTML = html;
    holder.querySelectorAll('input[name="csrf"]').forEach(function (input) { input.value = csrf; });
    return holder;
  }

  var source = new EventSource(url);
  source.addEventListener("row", function (event) {
    var data = JSON.parse(event.data);
    var old = document.getElementById("job-" + data.id);
    if (!data.html) { if (old) old.remove(); return; }
    var row = fragment(data.html, "tbody").firstElementChild;
    var next = old ? old.querySelector('input[name="next"]') : null;
    row.querySelectorAll('input[name="next"]').forEach(function (input) { input.value = next ? next.value : location.pathname; });
    if (old) { old.replaceWith(row); return; }
    var body = document.getElementById("jobs");
    if (!body || !data.insert) return;
    var empty = document.getElementById("empty");
    if (empty) empty.remove();
    body.insertBefore(row, body.firstElementChild);
  });
  source.addEventListener("job", function (event) {
    var live = document.getElementById("live");
    if (live) live.replaceChildren.apply(live, fragment(JSON.parse(event.data).html, "div").childNodes);
  });
  source.addEventListener("banner", function (event) {
    var banner = document.getElementById("banner");
    if (banner) banner.innerHTML = JSON.parse(event.data).html;
  });
  source.addEventListener("reload", function () { location.reload(); });
}());
