# Kiln Ruby function bootstrap: evaluated once inside wizer.initialize (deploy); its state is snapshotted.
require "json"
module Kiln
  OUT = STDOUT          # the real stdout (fd 1): only the JSON result goes there
  $stdout = $stderr     # puts/print in user code go to the log
  # STDOUT.puts too: the constant names the log from here on (OUT keeps the real one).
  Object.send(:remove_const, :STDOUT)
  Object.const_set(:STDOUT, $stderr)
  APP = "/app"
  Dir.glob("#{APP}/vendor/*/lib").sort.reverse_each { |d| $LOAD_PATH.unshift(d) }  # vendored gems
  $LOAD_PATH.unshift("#{APP}/lib", APP)
  MAIN = TOPLEVEL_BINDING.receiver
  begin
    load(ENV.fetch("KILN_HANDLER", "#{APP}/main.rb"))   # user top-level code runs here, at deploy
  rescue Exception => e
    $stderr.puts "loading the function failed: #{e.class}: #{e.message}", e.backtrace
    $stderr.flush
    exit!(70)
  end
  $stderr.flush

  def self.restore
    srand   # Random::DEFAULT was seeded at deploy and is shared by every instance: reseed
    MAIN.send(:on_restore) if MAIN.respond_to?(:on_restore, true)
  rescue Exception => e
    $stderr.puts "on_restore failed: #{e.class}: #{e.message}", e.backtrace
    $stderr.flush
    exit!(1)
  end

  def self.invoke
    raw = STDIN.read
    event = begin
      raw.strip.empty? ? nil : JSON.parse(raw)
    rescue JSON::ParserError => e
      $stderr.puts "invalid JSON input: #{e.message}"
      $stderr.flush
      exit!(2)
    end
    begin
      out = JSON.generate(MAIN.send(:handler, event))
    rescue Exception => e
      $stderr.puts "#{e.class}: #{e.message}", e.backtrace
      $stderr.flush
      exit!(1)
    end
    OUT.write(out, "\n")
    OUT.flush
    $stderr.flush
  end
end
nil
