// The official OpenAI Node SDK through Backstop: a background response,
// streamed, its connection dropped mid-stream, resumed with
// responses.retrieve({stream: true, starting_after}) from the next event.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });
const words = "one two three four five six seven eight nine ten";
const expected = `You said: ${words}`;
const assert = (ok, what) => {
  if (!ok) throw new Error(`check failed: ${what}`);
};

const first = [];
let id;
const stream = await client.responses.create({
  model: "gpt-4o-mini",
  input: words,
  background: true,
  stream: true,
});
for await (const event of stream) {
  first.push(event);
  id = id ?? event.response?.id;
  if (first.length === 6) break; // the client drops the connection
}
stream.controller.abort();
assert(id?.startsWith("resp_"), `an id: ${id}`);
assert(first[0].response.status === "queued", "created queued");
const last = first[first.length - 1].sequence_number;

const rest = [];
const resumed = await client.responses.retrieve(id, { stream: true, starting_after: last });
for await (const event of resumed) rest.push(event);
assert(rest[0].sequence_number === last + 1, `resumed at ${rest[0].sequence_number}, after ${last}`);

const all = [...first, ...rest];
all.forEach((e, i) => assert(e.sequence_number === i, `event ${i} is ${e.sequence_number}`));
const text = all
  .filter((e) => e.type === "response.output_text.delta")
  .map((e) => e.delta)
  .join("");
assert(text === expected, `text ${JSON.stringify(text)}`);
assert(all[all.length - 1].type === "response.completed", "ends completed");

const done = await client.responses.retrieve(id);
assert(done.status === "completed" && done.output_text === expected, `retrieved ${done.status}`);
console.log("node sdk checks passed");
